"""`hw merge-lora`, `hw extract-lora`, `hw convert-lora`: exact, streaming LoRA tools for SDXL."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import Json, Overwrite, Threads, console, print_json, progress, warn
from pycore.errors import HwError


def _para(text: str) -> str:
    """Join hard-wrapped lines so the terminal wraps the help paragraphs."""
    return "\n\n".join(" ".join(p.split("\n")) for p in text.strip().split("\n\n"))

OutFile = Annotated[Path, typer.Option("--out", "-o", help="Output file (or folder), written atomically.", show_default=False)]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow pickled LoRA files (.ckpt/.pt/.bin); loaded with torch.load(weights_only=True). Pickles are refused otherwise.")]
Format = Annotated[str, typer.Option("--format", "-f", help="Output LoRA format: kohya (ComfyUI/A1111/Forge), diffusers, or peft (a folder).")]
Layout = Annotated[str, typer.Option("--kohya-layout", help="UNet names in kohya output: sgm (lora_unet_input_blocks_…, what webui tools write) or diffusers (lora_unet_down_blocks_…).")]
Device = Annotated[str, typer.Option("--device", help="Where the fp32 math runs (cpu, cuda, cuda:1). Tensors are still streamed one at a time.")]
Rank = Annotated[int | None, typer.Option("--rank", "-r", help="LoRA rank per layer (SVD truncation).", min=1)]
Energy = Annotated[float | None, typer.Option("--energy", help="Instead of --rank: per layer, the smallest rank keeping this fraction of the Frobenius norm (e.g. 0.9), up to --max-rank.", min=0.0, max=1.0)]
MaxRank = Annotated[int | None, typer.Option("--max-rank", help="Largest rank --energy may pick (default 128).", min=1)]
Svd = Annotated[str, typer.Option("--svd", help="SVD method: auto (randomized low-rank SVD for large layers, full for small ones), lowrank, or full (exact, slow).")]

MERGE_HELP = """Merge LoRAs into an SDXL checkpoint, or into one LoRA.

[bold]hw merge-lora BASE LORA[:WEIGHT] ... --out OUT[/bold]: BASE is a single-file SDXL .safetensors
(SGM names) or a diffusers folder; the output has the same layout. W' = W + Σ w·(alpha/r)·up@down
in fp32, cast once to --dtype (default: the base's). Tensors are streamed one at a time, so memory
stays near the largest tensor. UNet and both text encoders; linear, 1×1 and 3×3 conv layers. Every
LoRA key must land on a weight, or the command fails naming them (--allow-unused to warn instead).

[bold]hw merge-lora --into-lora LORA[:WEIGHT] ... --out OUT[/bold]: combine LoRAs exactly by concatenating
ranks (default), or compress the exact sum by SVD with --rank / --energy (per-layer error reported).
"""


def register(app: typer.Typer) -> None:
    app.command("merge-lora", help=_para(MERGE_HELP), no_args_is_help=True)(merge_lora)
    app.command("extract-lora", help=_para(EXTRACT_HELP), no_args_is_help=True)(extract_lora)
    app.command("convert-lora", help=_para(CONVERT_HELP), no_args_is_help=True)(convert_lora)


def _set_threads(threads: int | None) -> None:
    """Torch intra-op threads: --threads, else $HW_THREADS, else torch's default (0)."""
    from pycore.scan import threads_from_env

    n = threads_from_env(threads)
    if n > 0:
        import torch

        torch.set_num_threads(n)


def _check_choice(value: str, choices: tuple[str, ...], opt: str) -> None:
    if value not in choices:
        raise HwError(f"{opt} must be one of {', '.join(choices)}, not {value!r}")


def _prepare_lora_output(threads: int | None, fmt: str, layout: str) -> None:
    """Shared set-up of the commands that write a LoRA: threads, format and kohya layout checks."""
    _set_threads(threads)
    _check_choice(fmt, ("kohya", "diffusers", "peft"), "--format")
    _check_choice(layout, ("sgm", "diffusers"), "--kohya-layout")


def merge_lora(
    inputs: Annotated[list[str], typer.Argument(help="BASE then LORA[:WEIGHT]...; with --into-lora only LORA[:WEIGHT]...", show_default=False)],
    out: OutFile,
    into_lora: Annotated[bool, typer.Option("--into-lora", help="Merge the LoRAs into one LoRA instead of into a checkpoint.")] = False,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Output dtype: fp16, bf16 or fp32 (default: the base's; fp32 for --into-lora).")] = None,
    allow_unused: Annotated[bool, typer.Option("--allow-unused", help="Warn instead of failing when LoRA layers have no weight in the base.")] = False,
    rank: Rank = None,
    energy: Energy = None,
    max_rank: MaxRank = None,
    svd: Svd = "auto",
    fmt: Format = "kohya",
    layout: Layout = "sgm",
    device: Device = "cpu",
    trust_pickle: TrustPickle = False,
    threads: Threads = None,
    json_out: Json = False,
    overwrite: Overwrite = False,
) -> None:
    from pycore.lora.combine import merge_loras
    from pycore.lora.merge import LoraSpec, merge_into_checkpoint

    _prepare_lora_output(threads, fmt, layout)
    if into_lora:
        specs = [LoraSpec.parse(s) for s in inputs]
        rep = merge_loras(specs, out, fmt=fmt, layout=layout, rank=rank, energy=energy, max_rank=max_rank, dtype=dtype,
                          overwrite=overwrite, trust_pickle=trust_pickle, device=device, svd=svd)  # fmt: skip
        if json_out:
            print_json(rep.__dict__)
            return
        console.print(f"[green]wrote[/green] {rep.out}: {rep.layers} layers, rank {rep.rank}, {rep.mode} of {len(rep.loras)} LoRA(s) in {rep.seconds:.1f}s")
        if rep.mode == "svd":
            worst = sorted(rep.errors.items(), key=lambda kv: -kv[1])[:5]
            t = Table("layer (worst relative error)", "error", title=f"SVD error: mean {rep.mean_error:.4f}, max {rep.max_error:.4f}")
            for k, v in worst:
                t.add_row(k, f"{v:.4f}")
            console.print(t)
        return
    if rank is not None or energy is not None or max_rank is not None:
        raise HwError("--rank/--energy/--max-rank only apply with --into-lora")
    if len(inputs) < 2:
        raise HwError("give BASE and at least one LORA[:WEIGHT]")
    specs = [LoraSpec.parse(s) for s in inputs[1:]]
    with progress(disable=json_out) as bar:
        task = bar.add_task("merging", total=None, rate="")
        rep = merge_into_checkpoint(Path(inputs[0]), specs, out, dtype=dtype, allow_unused=allow_unused, overwrite=overwrite,
                                    trust_pickle=trust_pickle, device=device, warn=warn,
                                    on_tensor=lambda i, n: bar.update(task, completed=i, total=n))  # fmt: skip
    if json_out:
        print_json(rep.__dict__)
        return
    t = Table("LoRA", "weight", "layers", "format", title=f"merged into {rep.base}")
    for lo in rep.loras:
        t.add_row(Path(lo["path"]).name, f"{lo['weight']:g}", str(lo["layers"]), lo["format"])
    console.print(t)
    for lo in rep.loras:
        for note in lo["notes"]:
            console.print(f"  {Path(lo['path']).name}: {note}")
    mods = ", ".join(f"{k} {v}" for k, v in rep.modules_merged.items())
    console.print(f"[green]wrote[/green] {rep.out} ({rep.tensors_written} tensors, dtype {rep.dtype}); modules changed: {mods} in {rep.seconds:.1f}s")


EXTRACT_HELP = """Extract a LoRA from a fine-tuned SDXL checkpoint: per-layer SVD of TUNED − BASE in fp32.

Both may be single-file .safetensors or diffusers folders. Attention layers, conv layers (LoCon;
--no-conv to skip) and both text encoders (--no-text-encoders to skip) are included; layers whose
largest difference is at most --min-diff (default 1e-6) count as unchanged and are reported, never
silently dropped. Prints the fraction of the difference kept per block and overall.
"""


def extract_lora(
    tuned: Annotated[Path, typer.Argument(help="The fine-tuned checkpoint (file or diffusers folder).", show_default=False)],
    base: Annotated[Path, typer.Argument(help="The base checkpoint it was tuned from.", show_default=False)],
    out: OutFile,
    rank: Rank = None,
    energy: Energy = None,
    max_rank: MaxRank = None,
    svd: Svd = "auto",
    no_conv: Annotated[bool, typer.Option("--no-conv", help="Skip ResnetBlock/Downsample/Upsample conv layers (attention layers only, like kohya without conv_dim).")] = False,
    no_text_encoders: Annotated[bool, typer.Option("--no-text-encoders", help="Skip both text encoders.")] = False,
    min_diff: Annotated[float, typer.Option("--min-diff", help="A layer whose largest |difference| is at most this is reported as unchanged and skipped.", min=0.0)] = 1e-6,
    clamp_quantile: Annotated[float | None, typer.Option("--clamp-quantile", help="Clamp up/down values to this quantile of their magnitudes (kohya uses 0.99). Off by default.", min=0.0, max=1.0)] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="LoRA dtype: fp16, bf16 or fp32.")] = "fp16",
    fmt: Format = "kohya",
    layout: Layout = "sgm",
    device: Device = "cpu",
    threads: Threads = None,
    json_out: Json = False,
    overwrite: Overwrite = False,
) -> None:
    from pycore.lora.extract import SvdOptions, extract_lora as run

    _prepare_lora_output(threads, fmt, layout)
    opts = SvdOptions(rank=rank, energy=energy, max_rank=max_rank, method=svd, clamp_quantile=clamp_quantile, device=device)
    with progress(disable=json_out) as bar:
        task = bar.add_task("extracting", total=None, rate="")
        rep = run(tuned, base, out, opts, fmt=fmt, layout=layout, conv=not no_conv, text_encoders=not no_text_encoders,
                  min_diff=min_diff, dtype=dtype, overwrite=overwrite, on_layer=lambda i, n: bar.update(task, completed=i, total=n))  # fmt: skip
    if json_out:
        print_json(rep.__dict__)
        return
    t = Table("block", "difference kept", title="fraction of ‖TUNED − BASE‖ kept")
    for b, v in rep.kept_by_block.items():
        t.add_row(b, f"{v:.2%}")
    t.add_row("[bold]overall[/bold]", f"[bold]{rep.kept_overall:.2%}[/bold]")
    console.print(t)
    for comp, n in rep.unchanged.items():
        console.print(f"  {comp}: {n} layer(s) unchanged (max |diff| ≤ {min_diff:g}), not extracted; largest |diff| anywhere in {comp}: {rep.max_diff_by_component.get(comp, 0):.3g}")
    comps = ", ".join(f"{k} {v}" for k, v in rep.components.items())
    console.print(f"[green]wrote[/green] {rep.out}: {rep.layers} layers ({comps}), rank {rep.ranks} in {rep.seconds:.1f}s")


CONVERT_HELP = """Convert a LoRA between kohya, diffusers and PEFT formats without changing any number.

Keys, alphas and shapes are carried over exactly (no alpha = rank assumption when the source
stores alphas). kohya output gets the ss_* metadata webui tools read (ss_network_dim,
ss_network_alpha, ss_base_model_version, sshs_model_hash); --to peft writes a folder with one
adapter per component (unet/, text_encoder/, text_encoder_2/).
"""


def convert_lora(
    src: Annotated[Path, typer.Argument(help="A LoRA file (kohya, diffusers, PEFT) or PEFT adapter folder.", show_default=False)],
    out: OutFile,
    to: Annotated[str, typer.Option("--to", help="Target format: kohya, diffusers or peft.")],
    layout: Layout = "sgm",
    dtype: Annotated[str | None, typer.Option("--dtype", help="Cast weights to fp16, bf16 or fp32 (default: keep).")] = None,
    trust_pickle: TrustPickle = False,
    json_out: Json = False,
    overwrite: Overwrite = False,
) -> None:
    from pycore.lora.convert import convert_lora as run
    from pycore.lora.io import parse_dtype_option, torch_dtype

    _check_choice(to, ("kohya", "diffusers", "peft"), "--to")
    _check_choice(layout, ("sgm", "diffusers"), "--kohya-layout")
    dt = torch_dtype(parse_dtype_option(dtype)) if dtype else None
    rep = run(src, out, to, layout=layout, trust_pickle=trust_pickle, overwrite=overwrite, dtype=dt)
    if json_out:
        print_json(rep)
        return
    comps = ", ".join(f"{k} {v}" for k, v in rep["components"].items() if v)
    console.print(f"[green]wrote[/green] {rep['out']}: {rep['layers']} layers ({comps}), {rep['from']} → {rep['to']}")
    for note in rep["notes"]:
        console.print(f"  note: {note}")
