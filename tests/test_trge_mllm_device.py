"""identifier.backend=mllm on the job's device, checked on the CPU with tests/device_ledger's ledger.

The MLLM and the processor's tensors stayed on the CPU in a GPU job: every description and every test
image's answer ran the whole generation on the host.  The identifier now moves the frozen model once to the
job's device (desmoe.distributed.device(): the CPU here, so a CPU run is unchanged) and its inputs with it.
The ledger counts a ``.to(device)`` result as a device tensor, so it tells a moved model from one left alone,
and records any host tensor the generation would meet on the device.
"""
import numpy as np
import torch

from device_ledger import DeviceLedger
from test_trge_user_inputs import _tiny_mllm


def test_mllm_identifier_runs_on_the_jobs_device(tmp_path):
    from desmoe.recipes.trge.task_id import IdBatch, MLLMIdentifier, TaskInfo, load_mllm

    _tiny_mllm(tmp_path / "mllm")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    feats = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    ledger = DeviceLedger()
    with ledger:
        ident = MLLMIdentifier(str(tmp_path / "mllm"), n_images=2, max_new_tokens=2)
    params = list(ident.model.parameters())
    assert params and all(p in ledger.device for p in params)  # moved (was: left where it was loaded)
    with ledger:
        feats = feats.to(ident.device)  # the evaluation's frozen features are device tensors
        ident.fit_task(TaskInfo("digits", ["0", "1"], feats, images=images[:2]))
        pred = ident.identify(IdBatch(feats, images=images))
    assert ledger.found == [], "\n".join(ledger.found)  # no host tensor met the device model
    assert pred.shape == (3,) and ident.tasks[0].description is not None
    # the same answers as the model loaded afresh and run on the host (a CPU job: nothing moved)
    processor, model = load_mllm(str(tmp_path / "mllm"))
    from PIL import Image

    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "describe"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[Image.fromarray(im) for im in images[:2]], text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    ref = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert ident._generate(list(images[:2]), "describe") == ref
