"""The TRGE experiment's configuration: one validated dataclass per YAML section."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from desmoe.config import bad
from desmoe.recipes.trge.backbones import BackboneConfig
from desmoe.recipes.trge.baselines import METHODS, METHODS_BY_NAME
from desmoe.recipes.trge.data import DataConfig
from desmoe.recipes.trge.groups import GroupSpec
from desmoe.recipes.trge.inter_group import InterGroupConfig
from desmoe.recipes.trge.model import Placement
from desmoe.recipes.trge.task_id import IdentifierConfig
from desmoe.recompute import check_mode
from desmoe.training.trainer import RunConfig


@dataclass
class TrainConfig:
    steps_per_task: int = 100
    micro_batch: int = 32
    # micro-batches per optimizer step: a step trains on micro_batch * grad_accum samples a rank, exactly as
    # one batch of them would (accumulate.py); lr, log, save and task ends count optimizer steps
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 10
    label_smoothing: float = 0.2
    eval_batch: int = 128
    proto_samples: int = 512  # training images per task for the prototype / identifier
    log_every: int = 10
    seed: int = 42
    save_every: int = 0  # steps between checkpoints inside a task (0 = at task ends and on preemption only)
    # Reuse the frozen CNN's pooled features of each sampled training image (embedded tower only):
    # several times faster, at the price of no random-crop augmentation for the image-side adapters.
    cache_image_features: bool = False
    # Where the frozen CNN features of all images are kept between runs (content-keyed; "" = recompute
    # every run).  A CNN tower's features never change, so every method and ablation shares them.
    feature_cache: str = "cache/trge_features"
    # none | layers: recompute each adapted tower block in backward (desmoe.recompute; the blocks below a
    # tower's first adapted one and a tower without groups keep nothing for backward and stay plain)
    activation_checkpointing: str = "none"

    def check(self) -> None:
        for key in ("steps_per_task", "micro_batch", "grad_accum", "eval_batch", "proto_samples", "log_every"):
            if getattr(self, key) < 1:
                raise bad(key, "an integer >= 1", getattr(self, key))
        if self.save_every < 0:
            raise bad("save_every", "an integer >= 0", self.save_every)
        if self.warmup < 0:
            raise bad("warmup", "an integer >= 0", self.warmup)
        # the generators are seeded with seed * 10**6 + ... and the experts with (seed * 1000 + block) *
        # 1_000_003 + expert: a seed past ~1.8e10 overflowed torch's 64-bit seed (a traceback at set-up);
        # negative ones refused as the LM recipes refuse them
        if not 0 <= self.seed < 2**32:
            raise bad("seed", "an integer in [0, 2**32)", self.seed)
        # here, not in the DeepSpeed config check, which would name configs/zero2.json for it
        if not 0 < self.lr < 1:
            raise bad("lr", "a number in (0, 1)", self.lr)
        if not 0 <= self.label_smoothing < 1:  # else cross_entropy fails at the first step
            raise bad("label_smoothing", "a number in [0, 1)", self.label_smoothing)
        check_mode(self.activation_checkpointing)


@dataclass
class FusionConfig:
    schedule: str = "progress"  # progress (lambda = t/T) | constant | frozen (no fusion) | adapted
    lam_max: float = 1.0

    def check(self) -> None:
        # lambda mixes two probability vectors: outside [0, 1] the "probabilities" go negative
        if not 0 <= self.lam_max <= 1:
            raise bad("lam_max", "a number in [0, 1]", self.lam_max)
        if self.schedule in ("frozen", "adapted") and self.lam_max != 1.0:  # λ is 0 / 1 there, lam_max unread
            raise bad("lam_max", f"unset with fusion.schedule={self.schedule} (it applies to progress and "
                                 f"constant only)", self.lam_max)


# Test-time variants, evaluated on the same trained groups; "+" combines them (e.g. oracle+no_fusion).
VARIANT_INTER = {  # atoms that change the inter-group routing config
    "no_inter": lambda c: dataclasses.replace(c, reading="own"),
    "text_image": lambda c: dataclasses.replace(c, text_routing="image"),
    "text_vocabulary": lambda c: dataclasses.replace(c, text_routing="vocabulary"),
    "names_route": lambda c: dataclasses.replace(c, unknown_names="route"),
    "names_unseen": lambda c: dataclasses.replace(c, unknown_names="unseen"),
    "filter_none": lambda c: dataclasses.replace(c, group_filter="none"),
    "filter_novel_set": lambda c: dataclasses.replace(c, group_filter="novel_set"),
    "filter_vocabulary": lambda c: dataclasses.replace(c, group_filter="vocabulary"),
}
VARIANTS = ("no_fusion", "oracle", *VARIANT_INTER)


def variant_inter(variant: str, inter: InterGroupConfig) -> InterGroupConfig:
    for atom in variant.split("+"):
        inter = VARIANT_INTER.get(atom, lambda c: c)(inter)
    return inter


@dataclass
class EvalConfig:
    # Ablations that change only the test-time path, evaluated on the same trained groups
    # after every task: no_inter (own group only), no_fusion (lambda = 0), oracle (true task ids), and the
    # class-name readings text_*, names_*, filter_* (inter_group.py); "+" combines atoms.
    variants: list[str] = field(default_factory=list)

    def check(self) -> None:
        for v in self.variants:
            if not v or any(atom not in VARIANTS for atom in v.split("+")):
                raise bad("variants", "a list of " + ", ".join(VARIANTS) + " or '+'-joined atoms", self.variants)
        # two atoms setting one inter key (text_image+text_vocabulary): the last one won, the name said both
        for v in self.variants:
            atoms = v.split("+")
            keys = [a.split("_")[0] for a in atoms if a in VARIANT_INTER and a != "no_inter"] + \
                [a for a in atoms if a not in VARIANT_INTER or a == "no_inter"]
            clash = next((k for k in keys if keys.count(k) > 1), None)
            if clash is not None:
                raise bad("variants", f"at most one atom of each kind in a variant ({clash}* twice)", v)
        # a repeated variant would be evaluated twice per task, and its rows (2 per task) then dropped
        repeated = sorted({v for v in self.variants if self.variants.count(v) > 1})
        if repeated:
            raise bad("variants", "each variant once", repeated[0] + " twice")


@dataclass
class TRGERunConfig(RunConfig):
    """The trainer's run section with TRGE's defaults (also when a YAML ``run`` section omits them)."""

    name: str = "trge"
    keep_checkpoints: int = 2  # each tag holds only trainable state


@dataclass
class TRGEExperiment:
    method: str = "trge"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    groups: GroupSpec = field(default_factory=GroupSpec)
    placement: Placement = field(default_factory=Placement)
    inter: InterGroupConfig = field(default_factory=InterGroupConfig)
    identifier: IdentifierConfig = field(default_factory=IdentifierConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: TRGERunConfig = field(default_factory=TRGERunConfig)

    def check(self) -> None:
        if self.method not in METHODS:
            raise bad("method", "one of " + ", ".join(METHODS), self.method)
        # the layout a method needs was set over a conflicting groups.layout without a word (shared_pool ran the
        # pool whatever the config said), and the pool under a method that trains task groups (trge, continual_ft)
        # stopped at its first task with a KeyError (the pool defines no group)
        need = METHODS_BY_NAME[self.method].layout or "groups"
        if self.groups.layout not in ("", need):
            raise bad("groups.layout", f"{need} or unset with method={self.method} (the layout it runs on)",
                      self.groups.layout)
        # the pool's routers (baselines.PoolRouter) take no max_groups: a value set there was ignored
        if (self.groups.layout or need) == "pool" and self.groups.max_groups != GroupSpec.max_groups:
            raise bad("groups.max_groups", f"unset with groups.layout=pool (the pool's routers do not read it; it "
                                           f"applies to the groups layout only)", self.groups.max_groups)
        # a group of one expert: its top-1 gate weight is softmax of one logit, 1 whatever noise is added to it
        if (self.groups.layout or need) == "groups" and self.groups.experts_per_group == 1 \
                and self.groups.noisy != GroupSpec.noisy:
            raise bad("groups.noisy", "unset with groups.experts_per_group=1 (one expert a group: its gate weight is "
                                      "1, noisy or not)", self.groups.noisy)
        if self.eval.variants and not METHODS_BY_NAME[self.method].test_variants:
            raise bad("eval.variants", "empty unless method is trge", self.eval.variants)
        # ranges the sections' own checks (groups.py, inter_group.py, task_id.py) leave open
        if self.groups.scale == 0:  # every adapter's output is scaled to 0: nothing added, no gradient
            raise bad("groups.scale", "a nonzero number (0: the adapters add nothing and never learn)",
                      self.groups.scale)
        if self.inter.tau < 0:  # a cosine distance: below 0 no other group ever collaborates (reading own)
            raise bad("inter.tau", "a number >= 0 (a cosine distance between prototypes)", self.inter.tau)
        ident = self.identifier
        if ident.backend in ("prototype", "description") and not -1 <= ident.threshold <= 1:
            # a minimum cosine: above 1 every sample was unseen, below -1 none, without a word
            raise bad("identifier.threshold", f"a cosine in [-1, 1] with identifier.backend={ident.backend}",
                      ident.threshold)
        if ident.backend == "gaussian" and ident.threshold < 0:  # read as 0 (never unseen), silently
            raise bad("identifier.threshold", "a distance per dimension >= 0 with identifier.backend=gaussian "
                                              "(0: never unseen)", ident.threshold)
        held = round(ident.calibration_split * self.train.proto_samples)
        if ident.calibration_split > 0 and (held < 1 or self.train.proto_samples - held < 2):
            # split_for_calibration then calibrates on the fitting rows themselves: the split is dropped
            raise bad("identifier.calibration_split", f"a share holding out at least 1 of train.proto_samples="
                                                      f"{self.train.proto_samples} and leaving 2 to fit",
                      ident.calibration_split)
        if self.identifier.mllm_max_new_tokens < 1:  # generate() refused it after the MLLM had loaded
            raise bad("identifier.mllm_max_new_tokens", "an integer >= 1", self.identifier.mllm_max_new_tokens)
        # keys only a CNN image tower (embedded, towers, tiny_dual) or the shared_pool method reads are refused
        # elsewhere, not ignored: cache_image_features: true on a transformer tower kept its augmentation and
        # speed without a word (frozen_cnn_table returns None there)
        if self.backbone.kind in ("hf_clip", "tiny_clip"):
            for key in ("train.cache_image_features", "train.feature_cache", "placement.cnn_blocks"):
                section, name = key.split(".")
                value = getattr(getattr(self, section), name)
                if value != getattr(type(getattr(self, section))(), name):
                    raise bad(key, f"unset with backbone.kind={self.backbone.kind} (it applies to the CNN image "
                                   f"towers of embedded, towers and tiny_dual only)", value)
        else:  # a CNN image tower: its adapters are placement.cnn_blocks blocks on the pooled features (model.py)
            place = self.placement
            if "text" not in place.towers and place.layers:  # no transformer tower adapted: no layer read it
                raise bad("placement.layers", f"unset with backbone.kind={self.backbone.kind} and placement.towers="
                                              f"[image] (the CNN image tower takes placement.cnn_blocks; layers "
                                              f"apply to a transformer tower)", place.layers)
        if "image" not in self.placement.towers and self.placement.cnn_blocks != Placement.cnn_blocks:
            raise bad("placement.cnn_blocks", "unset without image in placement.towers (it sizes the image tower's "
                                              "adapters)", self.placement.cnn_blocks)
        # only TRGE's predict fuses with the frozen model (the baselines' ignore lambda: shared_pool sends an
        # unseen sample to the frozen model whole), so a fusion setting changed no baseline's number
        for key in ("schedule", "lam_max"):
            if self.method != "trge" and getattr(self.fusion, key) != getattr(FusionConfig, key):
                raise bad(f"fusion.{key}", f"unset with method={self.method} (it applies to trge only)",
                          getattr(self.fusion, key))
        if self.method != "shared_pool" and self.groups.pool_freeze_per_task != GroupSpec.pool_freeze_per_task:
            raise bad("groups.pool_freeze_per_task", f"unset with method={self.method} (it applies to shared_pool "
                                                     f"only)", self.groups.pool_freeze_per_task)
        from desmoe.recipes.trge.fusion import FUSION_SCHEDULES

        if self.fusion.schedule not in FUSION_SCHEDULES:
            raise bad("fusion.schedule", "one of " + ", ".join(FUSION_SCHEDULES), self.fusion.schedule)
        # the image tower's router keeps at most groups.max_groups groups: more inter-group weights would
        # be cut there (not renormalised) while the text side still mixed them all
        if self.inter.max_groups > self.groups.max_groups:
            raise bad("inter.max_groups", f"at most groups.max_groups={self.groups.max_groups} (the groups a "
                                          f"sample's route may take)", self.inter.max_groups)
