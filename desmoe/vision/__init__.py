"""Image tasks, loaders, transforms and zero-shot evaluation for CLIP-style models (TRGE)."""
from desmoe.vision.tasks import ImageTask, load_task_sequence  # noqa: F401
from desmoe.vision.transforms import to_pixel_values  # noqa: F401
