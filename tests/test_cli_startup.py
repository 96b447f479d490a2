"""Start-up: what `hw --help` and `hw bucket` import, and the Pydantic-free coercion of plain values
(cli.fastparams) giving exactly Typer's results and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer._click.exceptions import BadParameter
from typer._coercion import build_runtime_param

from cli import fastparams


def _bucket_command():  # noqa: ANN202
    import typer.main as tm

    from cli import bucket
    from cli.common import HwCommand

    app = typer.Typer()
    bucket.register(app)
    app.command("other")(lambda: None)  # two commands: a group, as in hw
    app.registered_commands[0].cls = HwCommand
    return tm.get_command(app).commands["bucket"]  # type: ignore[attr-defined]


def _bucket_params() -> list:
    return [p for p in _bucket_command().params if getattr(p, "type_descriptor", None) is not None]


def _ctx():  # noqa: ANN202
    import typer._click as click

    return click.Context(_bucket_command())


def _outcome(fn, value):  # noqa: ANN001, ANN202
    try:
        out = fn(value)
        return ("ok", type(out).__name__, repr(out))  # repr: nan equals nan
    except BadParameter as e:
        return ("error", e.format_message())


INTS = ["0", "7", "-3", "0012", "123456789012", "+5", " 5", "5 ", "1_000", "1e3", "1.0", "", "abc", "٣", "9" * 25]
FLOATS = ["0.3", "0", "1", "-0.5", "0.000001", "1e-3", "1E2", ".5", "5.", "inf", "nan", "", "x", "1,5", "0.99"]


@pytest.mark.parametrize("name,values", [("threads", INTS), ("seed", INTS), ("max_crop", FLOATS), ("table", ["sdxl", "", "a b"])])
def test_fast_coercion_matches_typer(name, values):
    param = next(p for p in _bucket_params() if p.name == name)
    kind = fastparams.kind_of(param)
    assert kind is not None
    fast = fastparams.FastParam(param.type_descriptor.parameter_info, param.type_descriptor.annotation, kind)
    slow = build_runtime_param(param.type_descriptor)
    ctx = _ctx()
    for v in [*values, 5, 0.25, True]:
        got = _outcome(lambda x: fast.coerce(x, param=param, ctx=ctx), v)
        want = _outcome(lambda x: slow.coerce(x, param=param, ctx=ctx), v)
        assert got == want, (name, v)


def test_fast_path_coercion_matches_typer(tmp_path):
    params = {p.name: p for p in _bucket_params()}
    ctx = _ctx()
    (tmp_path / "f.txt").write_text("x")
    for name in ("src", "out", "plot"):
        param = params[name]
        assert fastparams.kind_of(param) == "path"
        fast = fastparams.FastParam(param.type_descriptor.parameter_info, param.type_descriptor.annotation, "path")
        slow = build_runtime_param(param.type_descriptor)
        for v in (str(tmp_path), str(tmp_path / "f.txt"), str(tmp_path / "missing"), "", "-", Path("x")):
            got = _outcome(lambda x: fast.coerce(x, param=param, ctx=ctx), v)
            assert got == _outcome(lambda x: slow.coerce(x, param=param, ctx=ctx), v), (name, v)


def test_fast_params_cover_bucket_and_keep_unusual_types_on_typer():
    kinds = {p.name: fastparams.kind_of(p) for p in _bucket_params()}
    assert None not in kinds.values(), kinds  # every `hw bucket` option is plain: no Pydantic on its path

    def cmd(mode: typer.FileText = typer.Option(...), n: int = typer.Option(1, clamp=True, max=3)) -> None: ...

    app = typer.Typer()
    app.command()(cmd)
    import typer.main as tm

    params = tm.get_command(app).params
    assert [fastparams.kind_of(p) for p in params if p.name in ("mode", "n")] == [None, None]


def _imported(argv: list[str]) -> list[str]:
    code = ("import sys\nfrom cli.app import main\n"
            f"rc = main({argv!r})\n"
            "print(rc, sorted(m for m in ('polars', 'numpy', 'torch', 'pyarrow', 'pydantic') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1].split(" ", 1)


def test_help_imports_no_pydantic():
    assert _imported(["--help"]) == ["0", "[]"]
    assert _imported(["bucket", "--help"]) == ["0", "[]"]
