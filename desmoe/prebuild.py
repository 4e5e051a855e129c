"""Build DeepSpeed's CPU shared-memory comm op once, at setup time.

Without this, the first ``deepspeed.init_distributed`` on a CPU machine spends
about a minute compiling it inside a job (or a test).  The build lands in this
environment's own ``TORCH_EXTENSIONS_DIR`` (see ``desmoe.distributed``).
"""
from desmoe.distributed import prepare_process, use_cuda


def main() -> None:
    prepare_process()
    if use_cuda():
        return
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


if __name__ == "__main__":
    main()
