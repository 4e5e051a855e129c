"""Task identification behind one interface: ``identify(batch) -> task ids | UNSEEN``.

Every backend learns one task at a time (``fit_task``, after the task is trained)
and decides **per sample**; ``BatchVote`` is the labelled per-batch variant
(majority vote over a batch, as MoE-Adapters' DDAS and DIKI do on
single-dataset loaders -- an easy advantage, never the default).

Backends (``build_identifier``):

* ``mllm``: a local HF image-text-to-text model. Training time: it describes a
  few images of the task in one sentence.  Test time: it sees the image and the
  numbered descriptions and answers a number or "none".
* ``description``: the task descriptions (the MLLM's if available, else
  "a photo of {classes}" made of the class names) embedded with the model's own
  frozen text tower; nearest description by cosine, threshold for unseen.
* ``prototype``: nearest task prototype (mean frozen image embedding), threshold.
* ``gaussian``: per-task Gaussian on frozen embeddings (DIKI); shrunk covariance,
  argmax log-likelihood; unseen when the best Mahalanobis distance per dimension
  exceeds the threshold.
* ``oracle``: the true task (an upper bound, labelled as such).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from desmoe.errors import UserError
from desmoe.recipes.trge.inter_group import UNSEEN

BACKENDS = ("mllm", "description", "prototype", "gaussian", "oracle")


@dataclass
class IdBatch:
    feats: Tensor  # [B, D] frozen image embeddings, L2-normalised
    images: Optional[np.ndarray] = None  # [B, H, W, 3] uint8 (for the MLLM)
    true_task: Optional[Tensor] = None  # [B]; UNSEEN for tasks not learned yet (oracle only)


@dataclass
class TaskInfo:
    name: str
    class_names: list[str]
    feats: Tensor  # [N, D] frozen image embeddings of (a sample of) the task's training set
    images: Optional[np.ndarray] = None  # a few training images for the MLLM
    description: Optional[str] = None


@dataclass
class IdentifierConfig:
    backend: str = "prototype"
    threshold: float = 0.0  # prototype/description: min cosine; gaussian: max distance per dim (0 = never unseen)
    # prototype: if > 0, a per-task threshold instead -- this quantile of the task's own training
    # samples' similarity to its prototype (0.05: 5% of a task's own samples would be called unseen)
    threshold_quantile: float = 0.0
    # share of a task's identifier samples held out from fitting, to calibrate the per-task threshold
    # on samples the prototype / Gaussian has not seen (0 = calibrate on the fitting samples themselves)
    calibration_split: float = 0.0
    per_batch: bool = False  # majority vote per batch (labelled variant)
    shrinkage: float = 0.5  # gaussian: covariance shrinkage towards its diagonal mean
    mllm_path: str = ""
    mllm_images: int = 4  # images shown to the MLLM to describe a task
    mllm_max_new_tokens: int = 40

    def check(self) -> None:
        from desmoe.config import bad

        if self.backend not in BACKENDS:
            raise bad("backend", "one of " + ", ".join(BACKENDS), self.backend)
        if not 0 <= self.threshold_quantile < 1:
            raise bad("threshold_quantile", "a number in [0, 1)", self.threshold_quantile)
        if not 0 <= self.calibration_split < 1:
            raise bad("calibration_split", "a number in [0, 1)", self.calibration_split)
        if not 0 <= self.shrinkage <= 1:  # a convex mix of the covariance and its diagonal target
            raise bad("shrinkage", "a number in [0, 1]", self.shrinkage)
        if self.mllm_images < 1:
            raise bad("mllm_images", "an integer >= 1", self.mllm_images)
        if self.backend == "mllm" and not self.mllm_path:
            raise bad("mllm_path", "the folder of a local HF image-text-to-text model", self.mllm_path)
        # a key the backend does not read is refused, not ignored (as backbone.* and data.*): e.g.
        # threshold_quantile with description, or shrinkage with prototype, changed nothing without a word.
        # Not for oracle: the documented ablation override (backend=oracle on any config) decides nothing
        if self.backend == "oracle":
            return
        import dataclasses

        for f in dataclasses.fields(self):
            if f.name not in ("backend", "per_batch", *ID_USES[self.backend]) and getattr(self, f.name) != f.default:
                users = [b for b, keys in ID_USES.items() if f.name in keys]
                raise bad(f.name, f"unset with identifier.backend={self.backend} (it applies to {', '.join(users)} "
                                  f"only)", getattr(self, f.name))
        if self.threshold_quantile > 0 and self.threshold != 0:  # the per-task quantile replaces it
            raise bad("threshold", "0 (unset) when threshold_quantile > 0 sets each task's threshold", self.threshold)
        if self.calibration_split > 0 and self.threshold_quantile == 0:  # held-out rows were fitted on by nobody
            raise bad("calibration_split", "0 unless threshold_quantile > 0 (it only calibrates that quantile; "
                                           "it removed fitting samples for nothing)", self.calibration_split)


# the keys each identifier.backend reads (every other key must keep its default)
ID_USES = {"prototype": ("threshold", "threshold_quantile", "calibration_split"),
           "gaussian": ("threshold", "threshold_quantile", "calibration_split", "shrinkage"),
           "description": ("threshold",),
           "mllm": ("mllm_path", "mllm_images", "mllm_max_new_tokens")}


class TaskIdentifier:
    name = "base"

    def __init__(self) -> None:
        self.tasks: list[TaskInfo] = []

    def fit_task(self, info: TaskInfo) -> None:
        self.tasks.append(info)

    @property
    def infos(self) -> list[TaskInfo]:
        """The learned tasks' inputs, in order (the evaluator builds the task prototypes from them)."""
        return self.tasks

    def identify(self, batch: IdBatch) -> Tensor:
        raise NotImplementedError


class OracleIdentifier(TaskIdentifier):
    name = "oracle"

    def identify(self, batch: IdBatch) -> Tensor:
        if batch.true_task is None:
            raise ValueError("the oracle identifier needs the true task ids")
        t = batch.true_task.clone()
        return torch.where(t < len(self.tasks), t, torch.full_like(t, UNSEEN))


def check_calibration(task: str, n: int, share: float, proto_samples: Optional[int] = None) -> int:
    """The rows of ``n`` identifier samples that ``identifier.calibration_split`` = ``share`` holds out.  A task
    with fewer training images than train.proto_samples has fewer samples than the config check assumed: a split
    that then holds out none or leaves fewer than 2 to fit was dropped without a word (the threshold calibrated
    on the fitting rows themselves); refused in one line instead (the recipe's set-up calls this per task)."""
    held = int(round(share * n))
    if share > 0 and (held < 1 or n - held < 2):
        cap = f"train.proto_samples={proto_samples} capped by its training images" if proto_samples else \
            "train.proto_samples capped by its training images"
        raise UserError(f"task '{task}': identifier.calibration_split={share} of its {n} identifier samples ({cap}) "
                        f"holds out {held} and leaves {n - held} to fit; expected at least 1 held out and 2 to fit "
                        f"(another calibration_split, or more training images)")
    return held


def split_for_calibration(feats: Tensor, share: float, task: str = "") -> tuple[Tensor, Tensor]:
    """(fitting rows, held-out rows): every k-th sample is held out (the samples are already a random
    draw); share 0 = calibrate on the fitting rows themselves."""
    n_cal = check_calibration(task, len(feats), share)
    if n_cal == 0:
        return feats, feats
    held = torch.zeros(len(feats), dtype=torch.bool, device=feats.device)
    held[torch.linspace(0, len(feats) - 1, n_cal).round().long()] = True
    return feats[~held], feats[held]


class PrototypeIdentifier(TaskIdentifier):
    name = "prototype"

    def __init__(self, threshold: float, quantile: float = 0.0, calibration_split: float = 0.0) -> None:
        super().__init__()
        self.threshold, self.quantile, self.calibration_split = threshold, quantile, calibration_split
        self.protos: list[Tensor] = []
        self.task_thresholds: list[float] = []

    def fit_task(self, info: TaskInfo) -> None:
        super().fit_task(info)
        fit, held = split_for_calibration(info.feats.float(), self.calibration_split, info.name)
        proto = F.normalize(fit.mean(0), dim=0)
        self.protos.append(proto)
        own = F.normalize(held, dim=-1) @ proto  # similarities a task's own new samples reach
        self.task_thresholds.append(float(torch.quantile(own, self.quantile)) if self.quantile > 0 else self.threshold)

    def identify(self, batch: IdBatch) -> Tensor:
        # fitted where the task's features were (a resumed run: the host); the batch's device decides
        sim = F.normalize(batch.feats.float(), dim=-1) @ torch.stack(self.protos).to(batch.feats.device).t()
        best, idx = sim.max(1)
        need = torch.tensor(self.task_thresholds, device=idx.device)[idx] if self.task_thresholds else torch.full_like(best, self.threshold)
        return torch.where(best >= need, idx, torch.full_like(idx, UNSEEN))


class DescriptionIdentifier(PrototypeIdentifier):
    """Nearest task description in the model's own text space."""

    name = "description"

    def __init__(self, threshold: float, embed_text: Callable[[list[str]], Tensor]) -> None:
        super().__init__(threshold)
        self.embed_text = embed_text

    def fit_task(self, info: TaskInfo) -> None:
        TaskIdentifier.fit_task(self, info)
        text = info.description or "a photo of " + ", ".join(info.class_names[:20])
        # Mean of the description and per-class prompts: a task is the set of its classes.
        prompts = [text] + [f"a photo of a {c}." for c in info.class_names]
        self.protos.append(F.normalize(self.embed_text(prompts).float().mean(0), dim=0))
        self.task_thresholds.append(self.threshold)


class GaussianIdentifier(TaskIdentifier):
    """Unseen when the best task's Mahalanobis distance per dimension exceeds ``threshold``, or, with
    ``quantile`` q > 0, that task's own (1 - q)-quantile on held-out training samples."""

    name = "gaussian"

    def __init__(self, threshold: float, shrinkage: float, quantile: float = 0.0,
                 calibration_split: float = 0.0) -> None:
        super().__init__()
        self.threshold, self.shrinkage = threshold, shrinkage
        self.quantile, self.calibration_split = quantile, calibration_split
        self.means: list[Tensor] = []
        self.precisions: list[Tensor] = []
        self.logdets: list[Tensor] = []
        self.task_thresholds: list[float] = []

    def fit_task(self, info: TaskInfo) -> None:
        super().fit_task(info)
        x, held = split_for_calibration(info.feats.double(), self.calibration_split, info.name)
        if self.shrinkage == 0 and x.shape[0] <= x.shape[1]:  # rank <= N-1 < D: inv() returned garbage silently
            raise UserError(f"identifier.shrinkage=0: task '{info.name}' has {x.shape[0]} fitting samples for "
                            f"{x.shape[1]} feature dims, so its covariance is singular; expected shrinkage > 0 or "
                            f"more than {x.shape[1]} samples (train.proto_samples, the task's training images)")
        mu = x.mean(0)
        cov = torch.cov((x - mu).t()) if x.shape[0] > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype,
                                                                           device=x.device)
        target = torch.eye(x.shape[1], dtype=x.dtype, device=x.device) * max(float(cov.diagonal().mean()), 1e-6)
        cov = (1 - self.shrinkage) * cov + self.shrinkage * target
        self.means.append(mu)
        self.precisions.append(torch.linalg.inv(cov))
        self.logdets.append(torch.linalg.slogdet(cov)[1])
        own = ((held - mu) @ self.precisions[-1] * (held - mu)).sum(1) / x.shape[1]
        self.task_thresholds.append(float(torch.quantile(own, 1 - self.quantile)) if self.quantile > 0
                                    else self.threshold)

    def identify(self, batch: IdBatch) -> Tensor:
        x = batch.feats.double()
        maha = torch.stack([((x - m.to(x.device)) @ p.to(x.device) * (x - m.to(x.device))).sum(1)
                            for m, p in zip(self.means, self.precisions)], 1)
        logp = -0.5 * (maha + torch.stack(self.logdets).to(x.device)[None])
        idx = logp.argmax(1)
        limit = torch.tensor(self.task_thresholds, dtype=x.dtype, device=x.device)[idx]
        per_dim = maha.gather(1, idx[:, None]).squeeze(1) / x.shape[1]
        return torch.where((limit <= 0) | (per_dim <= limit), idx, torch.full_like(idx, UNSEEN))


class BatchVote(TaskIdentifier):
    """Per-batch majority vote over an inner identifier (a labelled variant, not the default)."""

    def __init__(self, inner: TaskIdentifier) -> None:
        super().__init__()
        self.inner, self.name = inner, f"{inner.name}+batch-vote"

    def fit_task(self, info: TaskInfo) -> None:
        self.inner.fit_task(info)

    @property
    def infos(self) -> list[TaskInfo]:
        return self.inner.tasks  # the inner identifier holds the learned tasks

    def identify(self, batch: IdBatch) -> Tensor:
        ids = self.inner.identify(batch)
        values, counts = torch.unique(ids, return_counts=True)
        return torch.full_like(ids, int(values[counts.argmax()]))


# -- MLLM backend ------------------------------------------------------------------------------------
DESCRIBE_PROMPT = "Describe in one sentence what kind of images these are (their domain and subject)."
SELECT_PROMPT = ("Which of these image collections does this image belong to? Answer with the number only, "
                 "or 'none' if it fits none of them.\n{options}")


def parse_choice(answer: str, num_tasks: int) -> int:
    """First integer 1..num_tasks in the answer -> task index; 'none'/no number/out of range -> UNSEEN."""
    m = re.search(r"\d+", answer)
    if m is None:
        return UNSEEN
    k = int(m.group()) - 1
    return k if 0 <= k < num_tasks else UNSEEN


class MLLMIdentifier(TaskIdentifier):
    name = "mllm"

    def __init__(self, path: str, n_images: int = 4, max_new_tokens: int = 40) -> None:
        super().__init__()
        self.n_images, self.max_new_tokens = n_images, max_new_tokens
        self.processor, self.model = load_mllm(path)
        from desmoe.distributed import device

        # frozen: moved once to the job's device (a GPU job ran the MLLM on the CPU); a no-op on a CPU job
        self.device = device()
        self.model.to(self.device)

    def _generate(self, images: Sequence[np.ndarray], text: str) -> str:
        from PIL import Image

        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = self.processor(images=[Image.fromarray(im) for im in images], text=prompt, return_tensors="pt")
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.decode(out[0, inputs["input_ids"].shape[1]:].cpu(), skip_special_tokens=True).strip()

    def fit_task(self, info: TaskInfo) -> None:
        if info.description is None and info.images is not None:
            info.description = self._generate(list(info.images[: self.n_images]), DESCRIBE_PROMPT)
        super().fit_task(info)

    def identify(self, batch: IdBatch) -> Tensor:
        if batch.images is None:
            raise ValueError("the MLLM identifier needs the images")
        options = "\n".join(f"{i + 1}. {t.description or t.name}" for i, t in enumerate(self.tasks))
        answers = [self._generate([im], SELECT_PROMPT.format(options=options)) for im in batch.images]
        return torch.tensor([parse_choice(a, len(self.tasks)) for a in answers], device=batch.feats.device)


def load_mllm(path: str):
    """(processor, model) of a local HF image-text-to-text model, or one line saying why not."""
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise UserError(f"identifier.mllm_path '{path}': not a folder with a config.json "
                        f"(expected a local HF image-text-to-text model)")
    try:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(p, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(p, local_files_only=True).eval()
    except Exception as err:  # noqa: BLE001 - any load failure is the user's model folder
        why = " ".join(str(err).split())[:200]
        raise UserError(f"identifier.mllm_path '{path}': not a usable image-text-to-text model ({why})") from None
    return processor, model


def build_identifier(cfg: IdentifierConfig, embed_text: Optional[Callable[[list[str]], Tensor]] = None) -> TaskIdentifier:
    if cfg.backend == "oracle":
        ident: TaskIdentifier = OracleIdentifier()
    elif cfg.backend == "prototype":
        ident = PrototypeIdentifier(cfg.threshold, cfg.threshold_quantile, cfg.calibration_split)
    elif cfg.backend == "description":
        if embed_text is None:
            raise ValueError("the description identifier needs a text embedder")
        ident = DescriptionIdentifier(cfg.threshold, embed_text)
    elif cfg.backend == "gaussian":
        ident = GaussianIdentifier(cfg.threshold, cfg.shrinkage, cfg.threshold_quantile, cfg.calibration_split)
    else:
        ident = MLLMIdentifier(cfg.mllm_path, cfg.mllm_images, cfg.mllm_max_new_tokens)
    return BatchVote(ident) if cfg.per_batch else ident


def identification_accuracy(pred: Tensor, true_task: Tensor) -> float:
    """Share of samples given their true task (or UNSEEN for tasks not learned yet)."""
    return float((pred == true_task).float().mean()) * 100.0
