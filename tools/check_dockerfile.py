#!/usr/bin/env python3
"""Check the Dockerfile without a container engine (none is available here: see FACTS.md).

Static checks (always):
  - every `COPY` source from the build context exists and survives `.dockerignore`;
  - the base image is pinned to a patch version (never `latest`);
  - the final stage runs as a numeric non-root user, has `auto-trace` as its entrypoint, sets
    AUTO_TRACE_SCHEMAS_DIR to the directory that `COPY schemas/` fills, and copies nothing from
    the build context but the schemas (the package comes from the build stage).

With --install, the build stages' instructions are *executed* on this machine, in a temporary
root (paths under /opt and /src are moved into it; `python` is this interpreter): the context is
copied as `.dockerignore` filters it, each COPY, ENV, WORKDIR and RUN of every stage but the last
is applied in order (the `native` stage compiles the Rust fast path with this machine's cargo;
its `apt-get` line, the base image's system packages, is not run), then the final stage's COPYs
and ENV. The final stage's RUN (user creation,
removing pip from the system Python) changes the system and is not executed. Then the image's
entrypoint is started with the final stage's environment from another directory: `--version`,
`topics create --dry-run` on a sample configuration, and both Avro schemas loaded from
AUTO_TRACE_SCHEMAS_DIR, with a check that the package came from the virtualenv, not the
checkout, and that the native fast path is in it.

    python3 tools/check_dockerfile.py [--install] [--keep DIR]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Instruction:
    op: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with line continuations joined."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        op, _, rest = text.partition(" ")
        op = op.upper()
        if op == "FROM":
            parts = rest.split()
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif not stages:
            if op == "ARG":
                key, _, value = rest.strip().partition("=")
                args[key] = value
        else:
            stages[-1].instructions.append(Instruction(op, rest.strip(), start))
    return args, stages


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: variables.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )


def dockerignore_rules(path: Path) -> list[tuple[bool, str]]:
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        rules.append((negate, pattern.strip("/")))
    return rules


def _matches(pattern: str, rel: str) -> bool:
    """Docker's matching: a pattern matches a path or any of its parent directories."""
    regex = fnmatch.translate(pattern).replace(".*.*/", "(.*/)?").replace(".*.*", ".*")
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        if re.match(regex, prefix) or (
            pattern.startswith("**/") and re.match(fnmatch.translate(pattern[3:]), parts[i - 1])
        ):
            return True
    return False


def included(rel: str, rules: list[tuple[bool, str]]) -> bool:
    """Whether a context path is sent to the builder (the last matching rule wins)."""
    keep = True
    for negate, pattern in rules:
        if _matches(pattern, rel):
            keep = negate
    return keep


def context_files(root: Path, rules: list[tuple[bool, str]]) -> list[str]:
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and ".git" not in path.relative_to(root).parts:
            rel = path.relative_to(root).as_posix()
            if included(rel, rules):
                files.append(rel)
    return files


def copy_sources(instruction: Instruction) -> tuple[list[str], str, str | None]:
    words = shlex.split(instruction.args)
    source_stage = None
    rest = []
    for word in words:
        if word.startswith("--from="):
            source_stage = word.split("=", 1)[1]
        elif not word.startswith("--"):
            rest.append(word)
    return rest[:-1], rest[-1], source_stage


def static_checks(dockerfile: Path, context: Path) -> list[str]:
    problems: list[str] = []
    global_args, stages = parse_dockerfile(dockerfile)
    rules = dockerignore_rules(context / ".dockerignore")
    files = context_files(context, rules)
    for stage in stages:
        base = substitute(stage.base, global_args)
        if not re.match(r"^[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$", base):
            problems.append(f"FROM {base}: pin the base image to a patch version")
        for ins in stage.instructions:
            if ins.op not in ("COPY", "ADD"):
                continue
            if ins.op == "ADD":
                problems.append(f"line {ins.line}: use COPY, not ADD")
            sources, _, from_stage = copy_sources(ins)
            if from_stage:
                continue
            for src in sources:
                rel = src.rstrip("/").removeprefix("./")
                if not (context / rel).exists():
                    problems.append(f"line {ins.line}: COPY {src}: no such path in the context")
                elif not any(f == rel or f.startswith(rel + "/") for f in files):
                    problems.append(f"line {ins.line}: COPY {src}: excluded by .dockerignore")
    final = stages[-1]
    ops = {ins.op: ins for ins in final.instructions}
    user = substitute(ops["USER"].args, _stage_args(final, global_args)) if "USER" in ops else ""
    if not re.match(r"^[1-9]\d*(:[1-9]\d*)?$", user):
        problems.append(f"final stage: USER {user or '(none)'}: use a numeric non-root user")
    entry = json.loads(ops["ENTRYPOINT"].args) if "ENTRYPOINT" in ops else None
    if entry != ["auto-trace"]:
        problems.append(f'final stage: ENTRYPOINT {entry}: expected ["auto-trace"]')
    env = _env(final, {})
    schema_copies = [
        copy_sources(i)[1]
        for i in final.instructions
        if i.op == "COPY" and not copy_sources(i)[2] and copy_sources(i)[0] == ["schemas/"]
    ]
    if not schema_copies or env.get("AUTO_TRACE_SCHEMAS_DIR", "").rstrip("/") != schema_copies[
        0
    ].rstrip("/"):
        problems.append("final stage: AUTO_TRACE_SCHEMAS_DIR must name where schemas/ is copied")
    for ins in final.instructions:
        if ins.op == "COPY" and not copy_sources(ins)[2] and copy_sources(ins)[0] != ["schemas/"]:
            problems.append(f"line {ins.line}: the final stage copies {ins.args} from the context")
    return problems


def _stage_args(stage: Stage, global_args: dict[str, str]) -> dict[str, str]:
    values = dict(global_args)
    for ins in stage.instructions:
        if ins.op == "ARG":
            key, _, value = ins.args.partition("=")
            values[key] = value
    return values


def _env(stage: Stage, start: dict[str, str]) -> dict[str, str]:
    env = dict(start)
    for ins in stage.instructions:
        if ins.op == "ENV":
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                env[key] = substitute(value, env)
    return env


def _relocate(text: str, root: Path) -> str:
    return re.sub(r"(?<![\w.])/(opt|src)(?=/|\b)", lambda m: f"{root}/{m.group(1)}", text)


def _copy(sources: list[str], dest: str, base: Path, root: Path, cwd: Path) -> None:
    target = Path(_relocate(dest, root)) if dest.startswith("/") else cwd / dest
    for src in sources:
        source = base / src.rstrip("/")
        if source.is_dir():
            shutil.copytree(
                source, target if src.endswith("/") else target / source.name, dirs_exist_ok=True
            )
        else:
            (target if dest.endswith("/") else target.parent).mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / source.name if dest.endswith("/") else target)


SAMPLE_CONFIG = """\
kafka: {bootstrap_servers: "kafka:9092"}
adapters:
  - {name: hook, type: webhook, url: "https://tracker.example/h", secrets: [{env: HOOK_SECRET}]}
"""

SMOKE = """\
import consumer, pathlib, sys
from consumer.records import load_schema, schemas_dir
from consumer.native import load_native
for name in ("trade_closed.avsc", "trace_record.avsc"):
    load_schema(name)
assert "site-packages" in consumer.__file__, consumer.__file__
assert load_native(max_bytes=4096, skew_ms=0) is not None, "no native fast path in the image"
print("package", pathlib.Path(consumer.__file__).parent, "schemas", schemas_dir())
"""


def _run_stage(
    stage: Stage, global_args: dict[str, str], ctx: Path, root: Path, base_env: dict[str, str]
) -> None:
    """Apply one build stage's instructions here, relocated under ``root``.

    A ``COPY --from`` must copy a path to the same path (then an earlier stage already put it
    there); a ``RUN apt-get ...`` installs the base image's system packages and is not run.
    """
    env = dict(base_env)
    cwd = root
    for ins in stage.instructions:
        if ins.op == "ENV":
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                if key != "PIP_NO_CACHE_DIR":
                    env[key] = _relocate(substitute(value, env), root)
        elif ins.op == "WORKDIR":
            cwd = Path(_relocate(ins.args, root))
            cwd.mkdir(parents=True, exist_ok=True)
        elif ins.op == "COPY":
            sources, dest, from_stage = copy_sources(ins)
            if from_stage:
                if sources != [dest] or not Path(_relocate(dest, root)).exists():
                    raise SystemExit(
                        f"line {ins.line}: COPY --from must copy a path that an "
                        f"earlier stage made to the same path: {ins.args}"
                    )
                continue
            _copy(sources, dest, ctx, root, cwd)
        elif ins.op == "RUN":
            if ins.args.startswith("apt-get"):
                sys.stdout.write(f"  (not run here: RUN {ins.args})" + "\n")
                continue
            command = _relocate(substitute(ins.args, _stage_args(stage, global_args)), root)
            sys.stdout.write(f"+ RUN {command}" + "\n")
            subprocess.run(["sh", "-ec", command], cwd=cwd, env=env, check=True)


def install_check(dockerfile: Path, context: Path, root: Path) -> None:
    global_args, stages = parse_dockerfile(dockerfile)
    rules = dockerignore_rules(context / ".dockerignore")
    ctx = root / "context"
    for rel in context_files(context, rules):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(context / rel, ctx / rel)
    shim = root / "shim"
    shim.mkdir()
    (shim / "python").symlink_to(sys.executable)
    base_env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}")
    # Only a speed-up: the same packages, from pip's cache instead of the index every time.
    base_env.pop("PIP_NO_CACHE_DIR", None)
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "AUTO_TRACE_SCHEMAS_DIR"):
        base_env.pop(name, None)
    *builders, final = stages
    for stage in builders:
        _run_stage(stage, global_args, ctx, root, base_env)
    runtime_env = dict(base_env)
    for ins in final.instructions:
        if ins.op == "COPY":
            sources, dest, from_stage = copy_sources(ins)
            if from_stage:
                continue  # the build stage's files are already at the same (relocated) path
            _copy(sources, dest, ctx, root, root)
        elif ins.op == "ENV":
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                runtime_env[key] = _relocate(substitute(value, runtime_env), root)
        elif ins.op == "RUN":
            sys.stdout.write(f"  (not run here: RUN {ins.args})" + "\n")
    entry = json.loads(next(i.args for i in final.instructions if i.op == "ENTRYPOINT"))
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.yaml").write_text(SAMPLE_CONFIG, encoding="utf-8")
    runtime_env["HOOK_SECRET"] = "whsec_" + "A" * 32
    venv_python = Path(_relocate("/opt/auto-trace/venv/bin/python", root))
    for argv in (
        [*entry, "--version"],
        [*entry, "topics", "create", "--dry-run", "--config", "config.yaml"],
        [str(venv_python), "-c", SMOKE],
    ):
        sys.stdout.write(f"+ {' '.join(argv)}" + "\n")
        subprocess.run(argv, cwd=elsewhere, env=runtime_env, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="also execute the install steps")
    parser.add_argument("--keep", metavar="DIR", help="build in DIR and keep it")
    args = parser.parse_args()
    problems = static_checks(ROOT / "Dockerfile", ROOT)
    for problem in problems:
        sys.stderr.write(f"Dockerfile: {problem}" + "\n")
    if problems:
        return 1
    sys.stdout.write("Dockerfile: static checks passed" + "\n")
    if args.install:
        if args.keep:
            root = Path(args.keep).resolve()
            root.mkdir(parents=True, exist_ok=False)
            install_check(ROOT / "Dockerfile", ROOT, root)
        else:
            with tempfile.TemporaryDirectory(prefix="auto-trace-image-") as tmp:
                install_check(ROOT / "Dockerfile", ROOT, Path(tmp))
        sys.stdout.write("Dockerfile: install steps passed" + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
