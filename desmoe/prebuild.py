"""Build DeepSpeed's CPU shared-memory comm op and desmoe's fused CPU kernels once, at setup.

Without this, the first ``deepspeed.init_distributed`` on a CPU machine spends
about a minute compiling it inside a job (or a test).  The build lands in this
environment's own ``TORCH_EXTENSIONS_DIR`` (see ``desmoe.distributed``).
"""
from desmoe.distributed import prepare_process, use_cuda


def main() -> None:
    prepare_process()
    if use_cuda():
        return
    from desmoe.distributed import _load_shm_op
    from desmoe.kernels import swiglu_cpu

    _load_shm_op()
    if swiglu_cpu() is None:
        print("desmoe: fused CPU kernels could not be built; training falls back to torch ops")


if __name__ == "__main__":
    main()
