"""`hw merge-lora`, `hw extract-lora`, `hw convert-lora`, `hw lora-info`: parse options into a
request, call one pycore.lora function, render its report."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import BarProgress, Json, Overwrite, Threads, console, print_json

IO, SVD, OUTF, RUN = "Input and output", "Rank (SVD)", "Output format", "Runtime"


def _para(text: str) -> str:
    """Join hard-wrapped lines so the terminal wraps the help paragraphs."""
    return "\n\n".join(" ".join(p.split("\n")) for p in text.strip().split("\n\n"))


OutFile = Annotated[Path, typer.Option("--out", "-o", help="Output file (or folder), written atomically; never one of the inputs.", show_default=False, rich_help_panel=IO)]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow pickled LoRA files (.ckpt/.pt/.bin); loaded with torch.load(weights_only=True).", rich_help_panel=IO)]
Format = Annotated[str, typer.Option("--format", "-f", help="LoRA format written: kohya (ComfyUI/A1111/Forge), diffusers, or peft (a folder).", rich_help_panel=OUTF)]
Layout = Annotated[str, typer.Option("--kohya-layout", help="UNet names in kohya output: sgm (lora_unet_input_blocks_…, what UIs write) or diffusers (lora_unet_down_blocks_…).", rich_help_panel=OUTF)]
Dtype = Annotated[str | None, typer.Option("--dtype", help="Output dtype: fp16, bf16 or fp32.", rich_help_panel=OUTF)]
Device = Annotated[str, typer.Option("--device", help="Where the fp32 math runs: cpu, cuda, cuda:N, mps or auto. Tensors are still streamed.", rich_help_panel=RUN)]
Rank = Annotated[int | None, typer.Option("--rank", "-r", help="LoRA rank per layer (SVD truncation).", rich_help_panel=SVD)]
Energy = Annotated[float | None, typer.Option("--energy", help="Instead of --rank: per layer, the smallest rank keeping this fraction of the Frobenius norm (e.g. 0.9).", rich_help_panel=SVD)]
MaxRank = Annotated[int | None, typer.Option("--max-rank", help="Largest rank --energy may pick (default 128).", rich_help_panel=SVD)]
Svd = Annotated[str, typer.Option("--svd", help="auto (randomized SVD for large layers, full for small), lowrank, or full.", rich_help_panel=SVD)]
RThreads = Annotated[int | None, typer.Option("--threads", "-j", help="Torch threads (0 = one per core). Default: $HW_THREADS or 0.", rich_help_panel=RUN)]
RJson = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON report on stdout instead of tables.", rich_help_panel=RUN)]
ROverwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an output that already exists (never an input).", rich_help_panel=IO)]

MERGE_HELP = """Merge LoRAs of any family into an SDXL/SD1.5 checkpoint, or into one LoRA.

[bold]hw merge-lora BASE LORA[:WEIGHT] ... --out OUT[/bold]: BASE is a single-file .safetensors or a
diffusers folder; the output has the same layout. W' = W + Σ w·ΔW in fp32, each ΔW computed against
the base (LoRA/LoCon, LoHa, LoKr, DoRA, IA3, .diff/.diff_b, norms), cast once to --dtype and checked
finite after the cast. Tensors are streamed one at a time. A LoRA for another model family (SD1.5
vs SDXL) is refused; every key must land on a weight (--allow-unused to warn instead).

[bold]hw merge-lora --into-lora LORA[:WEIGHT] ... --out OUT[/bold]: combine exactly by concatenating
ranks, or factorise the exact sum with --rank / --energy (needed for LoHa/LoKr; error per block).

Example: hw merge-lora sdxl.safetensors style.safetensors:0.8 detail_loha.safetensors:0.5 --out merged.safetensors --dtype fp16
"""


def register(app: typer.Typer) -> None:
    app.command("merge-lora", help=_para(MERGE_HELP), no_args_is_help=True)(merge_lora)
    app.command("extract-lora", help=_para(EXTRACT_HELP), no_args_is_help=True)(extract_lora)
    app.command("convert-lora", help=_para(CONVERT_HELP), no_args_is_help=True)(convert_lora)
    app.command("lora-info", help=_para(INFO_HELP), no_args_is_help=True)(lora_info)


def _set_threads(threads: int | None) -> None:
    import torch

    from pycore.checks import resolve_threads

    torch.set_num_threads(resolve_threads(threads))


def merge_lora(
    inputs: Annotated[list[str], typer.Argument(help="BASE then LORA[:WEIGHT]...; with --into-lora only LORA[:WEIGHT]...", show_default=False)],
    out: OutFile,
    into_lora: Annotated[bool, typer.Option("--into-lora", help="Merge the LoRAs into one LoRA instead of into a checkpoint.", rich_help_panel=IO)] = False,
    allow_unused: Annotated[bool, typer.Option("--allow-unused", help="Warn instead of failing when LoRA layers have no weight in the base (never crosses model families).", rich_help_panel=IO)] = False,
    dtype: Dtype = None,
    rank: Rank = None,
    energy: Energy = None,
    max_rank: MaxRank = None,
    svd: Svd = "auto",
    fmt: Format = "kohya",
    layout: Layout = "sgm",
    device: Device = "cpu",
    trust_pickle: TrustPickle = False,
    threads: RThreads = None,
    json_out: RJson = False,
    overwrite: ROverwrite = False,
) -> None:
    from pycore.errors import HwError
    from pycore.lora.merge import LoraSpec

    specs = [LoraSpec.parse(s) for s in (inputs if into_lora else inputs[1:])]
    if into_lora:
        from pycore.lora.combine import LoraMergeRequest, merge_loras_request

        req = LoraMergeRequest(specs, out, fmt, layout, rank, energy, max_rank, svd, dtype, overwrite, trust_pickle, device)
        _set_threads(threads)
        with BarProgress(disable=json_out) as bar:
            rep = merge_loras_request(req, bar)
        return print_json(asdict(rep)) if json_out else _render_lora_merge(rep)
    if rank is not None or energy is not None or max_rank is not None:
        raise HwError("--rank/--energy/--max-rank only apply with --into-lora")
    if len(inputs) < 2:
        raise HwError("give BASE and at least one LORA[:WEIGHT]")
    from pycore.lora.merge import MergeRequest, merge_checkpoint

    creq = MergeRequest(Path(inputs[0]), specs, out, dtype, allow_unused, overwrite, trust_pickle, device)
    _set_threads(threads)
    with BarProgress(disable=json_out) as bar:
        crep = merge_checkpoint(creq, bar)
    if json_out:
        return print_json(asdict(crep))
    t = Table("LoRA", "weight", "layers", "families", "base", "format", title=f"merged into {crep.base} ({crep.base_family})")
    for lo in crep.loras:
        fams = ", ".join(f"{k} {v}" for k, v in lo["families"].items())
        t.add_row(Path(lo["path"]).name, f"{lo['weight']:g}", str(lo["layers"]), fams, lo["base"], lo["format"])
    console.print(t)
    mods = ", ".join(f"{k} {v}" for k, v in crep.modules_merged.items())
    console.print(f"[green]wrote[/green] {crep.out} ({crep.tensors_written} tensors, dtype {crep.dtype}); modules changed: {mods} in {crep.seconds:.1f}s")


def _render_lora_merge(rep) -> None:  # noqa: ANN001
    console.print(f"[green]wrote[/green] {rep.out}: {rep.layers} layers, rank {rep.rank}, {rep.mode} of {len(rep.loras)} LoRA(s) in {rep.seconds:.1f}s")
    if rep.mode == "svd":
        _render_errors(rep.error_by_block, rep.max_error)


def _render_errors(by_block: dict[str, float], worst: float) -> None:
    t = Table("block", "relative error ‖ΔW − LoRA‖/‖ΔW‖", title=f"SVD error per block (worst layer {worst:.4f})")
    for b, v in by_block.items():
        t.add_row(b, f"{v:.4%}")
    console.print(t)


EXTRACT_HELP = """Extract a LoRA from a fine-tuned SDXL/SD1.5 checkpoint: per-layer SVD of TUNED − BASE in fp32.

Both may be single-file .safetensors or diffusers folders (of the same model family). Attention
layers, conv layers (LoCon; --no-conv to skip) and the text encoders (--no-text-encoders to skip)
are included; layers whose largest difference is at most --min-diff count as unchanged and are
reported, never silently dropped. Prints the fraction of the difference kept per block.

Example: hw extract-lora tuned.safetensors sdxl_base.safetensors --rank 32 --out tuned_lora.safetensors
"""


def extract_lora(
    tuned: Annotated[Path, typer.Argument(help="The fine-tuned checkpoint (file or diffusers folder).", show_default=False)],
    base: Annotated[Path, typer.Argument(help="The base checkpoint it was tuned from.", show_default=False)],
    out: OutFile,
    rank: Rank = None,
    energy: Energy = None,
    max_rank: MaxRank = None,
    svd: Svd = "auto",
    clamp_quantile: Annotated[float | None, typer.Option("--clamp-quantile", help="Clamp up/down values to this quantile of their magnitudes (kohya uses 0.99). Off by default.", rich_help_panel=SVD)] = None,
    no_conv: Annotated[bool, typer.Option("--no-conv", help="Skip ResnetBlock/Downsample/Upsample conv layers.", rich_help_panel=IO)] = False,
    no_text_encoders: Annotated[bool, typer.Option("--no-text-encoders", help="Skip the text encoders.", rich_help_panel=IO)] = False,
    min_diff: Annotated[float, typer.Option("--min-diff", help="A layer whose largest |difference| is at most this is reported as unchanged and skipped.", rich_help_panel=IO)] = 1e-6,
    dtype: Annotated[str, typer.Option("--dtype", help="LoRA dtype: fp16, bf16 or fp32.", rich_help_panel=OUTF)] = "fp16",
    fmt: Format = "kohya",
    layout: Layout = "sgm",
    device: Device = "cpu",
    threads: RThreads = None,
    json_out: RJson = False,
    overwrite: ROverwrite = False,
) -> None:
    from pycore.lora.extract import ExtractRequest, SvdOptions, extract

    opts = SvdOptions(rank=rank, energy=energy, max_rank=max_rank, method=svd, clamp_quantile=clamp_quantile, device=device)
    req = ExtractRequest(tuned, base, out, opts, fmt, layout, not no_conv, not no_text_encoders, min_diff, dtype, overwrite)
    _set_threads(threads)
    with BarProgress(disable=json_out) as bar:
        rep = extract(req, bar)
    if json_out:
        return print_json(asdict(rep))
    t = Table("block", "difference kept", title="fraction of ‖TUNED − BASE‖ kept")
    for b, v in rep.kept_by_block.items():
        t.add_row(b, f"{v:.2%}")
    t.add_row("[bold]overall[/bold]", f"[bold]{rep.kept_overall:.2%}[/bold]")
    console.print(t)
    for comp, n in rep.unchanged.items():
        console.print(f"  {comp}: {n} layer(s) unchanged (max |diff| ≤ {min_diff:g}), not extracted; largest |diff| anywhere in {comp}: {rep.max_diff_by_component.get(comp, 0):.3g}")
    comps = ", ".join(f"{k} {v}" for k, v in rep.components.items())
    console.print(f"[green]wrote[/green] {rep.out}: {rep.layers} layers ({comps}), rank {rep.ranks} in {rep.seconds:.1f}s")


CONVERT_HELP = """Convert a LoRA of any family and layout into plain LoRA (kohya, diffusers or PEFT).

LoRA/LoCon (Tucker mid folded in) converts exactly; in kohya output DoRA keeps its dora_scale and
bias/norm differences stay .diff_b/.diff. LoHa, LoKr and full differences have no exact LoRA form:
give --rank or --energy and the relative error per block is reported. Model family (SD1.5/SDXL) and
its metadata are kept, never relabelled. Warns when the output will not load where you are heading.

Example: hw convert-lora downloaded_loha.safetensors --to kohya --rank 32 --out plain_lora.safetensors
"""


def convert_lora(
    src: Annotated[Path, typer.Argument(help="A LoRA file (kohya, LyCORIS, ComfyUI, diffusers, PEFT) or PEFT adapter folder.", show_default=False)],
    out: OutFile,
    to: Annotated[str, typer.Option("--to", help="Target format: kohya, diffusers or peft.", rich_help_panel=OUTF)] = "kohya",
    layout: Layout = "sgm",
    dtype: Annotated[str | None, typer.Option("--dtype", help="Cast weights to fp16, bf16 or fp32 (default: keep).", rich_help_panel=OUTF)] = None,
    rank: Rank = None,
    energy: Energy = None,
    max_rank: MaxRank = None,
    svd: Svd = "auto",
    device: Device = "cpu",
    trust_pickle: TrustPickle = False,
    json_out: RJson = False,
    overwrite: ROverwrite = False,
) -> None:
    from pycore.lora.convert import ConvertRequest, convert

    req = ConvertRequest(src, out, to, layout, rank, energy, max_rank, svd, dtype, trust_pickle, overwrite, device)
    with BarProgress(disable=json_out) as bar:
        rep = convert(req, bar)
    if json_out:  # "in"/"from" kept from the earlier JSON report
        return print_json({"in": rep.src, "from": rep.source_format, **asdict(rep)})
    comps = ", ".join(f"{k} {v}" for k, v in rep.components.items() if v)
    how = "exactly" if rep.lossless else f"{rep.factorised} layer(s) by SVD"
    console.print(f"[green]wrote[/green] {rep.out}: {rep.layers} layers ({comps}), {rep.source_format} → {rep.to} ({rep.base}), {how}")
    if rep.factorised:
        _render_errors(rep.error_by_block, rep.max_error)
    for note in rep.notes:
        console.print(f"  note: {note}")


INFO_HELP = """Describe a LoRA file: family (LoRA, LoCon, LoHa, LoKr, DoRA, IA3, full), layout, base model
(SD1.5/SDXL), rank per block, alphas, modules per component, ss_*/modelspec.* metadata, and whether
ComfyUI/Forge, A1111 and diffusers will load it.

Example: hw lora-info downloaded.safetensors --json
"""


def lora_info(
    path: Annotated[Path, typer.Argument(help="A LoRA file or PEFT adapter folder.", show_default=False)],
    trust_pickle: TrustPickle = False,
    json_out: RJson = False,
) -> None:
    from pycore.lora.info import InfoRequest, lora_info as run

    info = run(InfoRequest(path, trust_pickle))
    if json_out:
        return print_json(asdict(info))
    fams = ", ".join(f"{k} ×{v}" for k, v in info.families.items())
    console.print(f"[bold]{info.path}[/bold]\n  family: {fams}\n  layout: {', '.join(info.layouts)}\n  base model: {info.base} ({info.base_evidence})")
    console.print(f"  modules: {', '.join(f'{k} {v}' for k, v in info.modules.items())}\n  alpha: {', '.join(f'{a:g}' for a in info.alphas) or '-'}")
    t = Table("block", "rank", title="rank per block")
    for b, r in info.ranks.items():
        t.add_row(b, r)
    console.print(t)
    t = Table("tool", "loads it?", title="who will load it")
    for tool, verdict in info.loaders.items():
        t.add_row(tool, verdict)
    console.print(t)
    for k, v in info.metadata.items():
        console.print(f"  {k} = {v if len(v) < 120 else v[:117] + '…'}")
    for note in info.notes:
        console.print(f"  note: {note}")


__all__ = ["Json", "Overwrite", "Threads", "register"]
