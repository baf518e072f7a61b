"""`cdp apply` on hostile files: YAML aliases (a "billion laughs" bomb) and files too large
for the platform are refused with one clear line naming the file, never a traceback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.cli.apply import MAX_FILE_BYTES
from ops.cli.main import app
from ops.natsd import NatsServer, free_port, nats_server_binary

pytestmark = pytest.mark.asyncio


async def apply(nats_server: NatsServer, path: Path) -> tuple[int, str, BaseException | None]:
    runner = CliRunner()
    env = {"CDP_NATS_URL": nats_server.url}
    out = await asyncio.to_thread(runner.invoke, app, ["apply", "-f", str(path)], env=env)
    exception = out.exception if not isinstance(out.exception, SystemExit) else None
    return out.exit_code, " ".join(out.output.split()), exception


async def test_yaml_aliases_are_refused_with_file_and_line(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    bomb = tmp_path / "bomb.yaml"
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    bomb.write_text("\n".join(levels) + "\n")  # 9**9 strings when expanded
    code, output, exception = await apply(nats_server, bomb)
    assert exception is None
    assert code == 1
    assert f"{bomb}: line 1, column 4: YAML anchors (&name, *name) are not accepted" in output

    alias_only = tmp_path / "alias.yaml"
    alias_only.write_text("segments:\n  - name: a\n    expression: *x\n")
    code, output, exception = await apply(nats_server, alias_only)
    assert (code, exception) == (1, None)
    assert f"{alias_only}: line 3, column 17: YAML aliases" in output


async def test_an_oversize_file_is_refused_before_it_is_read(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    big = tmp_path / "big.yaml"
    line = "  - {name: s, expression: 'x exists'}\n"
    big.write_text("segments:\n" + line * (MAX_FILE_BYTES // len(line) + 1))
    code, output, exception = await apply(nats_server, big)
    assert (code, exception) == (1, None)
    assert f"{big}: larger than {MAX_FILE_BYTES} bytes" in output


async def test_a_request_larger_than_the_server_accepts_is_reported(tmp_path: Path) -> None:
    """Under the file limit, but more than one NATS message may carry once encoded (a
    server whose max_payload is 64 KiB, as an operator's own server may have)."""
    conf = tmp_path / "small.conf"
    conf.write_text("max_payload: 65536\n")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port)
    )
    try:
        many = tmp_path / "many.yaml"
        lines = [f"  - name: s{i:05}\n    expression: x exists\n" for i in range(1500)]
        many.write_text("segments:\n" + "".join(lines))
        server = NatsServer(tmp_path, port=port)
        await server._wait_listening(10)
        code, output, exception = await apply(server, many)
        assert exception is None, repr(exception)
        assert code == 1
        assert f"{many}: the segmentation objects (segment) encode to" in output
        assert "more than the 65536 bytes one NATS message may carry" in output
    finally:
        proc.terminate()
        await proc.wait()
