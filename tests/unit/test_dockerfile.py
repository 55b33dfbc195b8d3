"""The container image recipe, read as text: no Docker engine runs here.

The Dockerfile is parsed into instructions (continuation lines joined, comments kept
apart) and split into stages; each test checks one promise of the image: pinned bases,
a build stage that leaves nothing behind, Debian's iptables and conntrack in the
runtime, nmi as the entrypoint, and a build context that excludes local clutter.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    comments: list[str] = field(default_factory=list)  # the comment block just above


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _parse(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    comments: list[str] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            if not pending:
                comments.append(stripped.lstrip("#").strip())
            continue  # comment lines inside a continuation are dropped, as Docker does
        if not stripped:
            if not pending:
                comments = []
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(pending).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start, comments))
        pending, comments = [], []
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def _substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value
    )


def _stages(instructions: list[Instruction]) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            image = _substitute(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name, []))
        elif not stages:
            if ins.keyword == "ARG":
                key, _, default = ins.args.partition("=")
                global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(ins)
    return stages


INSTRUCTIONS = _parse(DOCKERFILE.read_text())
STAGES = _stages(INSTRUCTIONS)
FINAL = STAGES[-1]
BUILD_STAGES = STAGES[:-1]


def _commands(run: Instruction) -> list[list[str]]:
    """The simple commands of a shell-form RUN, split on && ; || |."""
    assert not run.args.startswith("["), "RUN in exec form is not expected here"
    commands: list[list[str]] = [[]]
    lexer = shlex.shlex(run.args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    for token in lexer:
        if token in ("&&", ";", "||", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _pip_commands(stage: Stage) -> list[list[str]]:
    found = []
    for run in stage.all("RUN"):
        for cmd in _commands(run):
            words = [w.rsplit("/", 1)[-1] for w in cmd]
            if any(re.fullmatch(r"pip[\d.]*", w) for w in words) and (
                "install" in words or "wheel" in words
            ):
                found.append(cmd)
    return found


# ---------------------------------------------------------------------------- the parser


def test_parser_joins_continuations_and_keeps_comments() -> None:
    text = "# about the base\nFROM a:1.2.3 AS x\n\n# install\nRUN one \\\n  # inner\n  && two\n"
    parsed = _parse(text)
    assert [(i.keyword, i.args, i.line) for i in parsed] == [
        ("FROM", "a:1.2.3 AS x", 2),
        ("RUN", "one && two", 5),
    ]
    assert parsed[1].comments == ["install"]
    assert _commands(parsed[1]) == [["one"], ["two"]]
    assert _stages(_parse("ARG B=img:1.0.0\nFROM ${B} AS x\nRUN y\n"))[0].image == "img:1.0.0"


# ---------------------------------------------------------------------------- the stages


def test_is_multi_stage_with_named_stages() -> None:
    assert len(STAGES) >= 2
    assert all(stage.name for stage in STAGES), "every stage is named (FROM ... AS name)"
    assert len({s.name for s in STAGES}) == len(STAGES)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name or s.image)
def test_every_base_is_pinned_to_a_full_version(stage: Stage) -> None:
    names = {s.name for s in STAGES}
    if stage.image in names:
        return
    image, _, digest = stage.image.partition("@")
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag, f"{stage.image} has no tag"
    assert tag != "latest"
    assert re.match(r"\d+\.\d+\.\d+(-|$)", tag), f"{stage.image}: tag is not a full version"
    if digest:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)


def test_runtime_uses_the_build_base() -> None:
    """The venv's interpreter is the base image's: both stages must share it."""
    assert {s.image for s in STAGES} == {FINAL.image}
    assert FINAL.image.startswith("python:3.11.")
    assert "slim" in FINAL.image


def test_build_stage_makes_wheels_and_a_venv() -> None:
    pips = [cmd for stage in BUILD_STAGES for cmd in _pip_commands(stage)]
    wheels = [c for c in pips if "wheel" in c]
    assert len(wheels) == 1
    assert "." in wheels[0] and wheels[0][wheels[0].index("-w") + 1] == "/wheels"
    installs = [c for c in pips if "install" in c]
    assert installs, "the venv is filled by pip install"
    for cmd in installs:
        assert "--no-index" in cmd, "only from the wheels just built"
        assert "--find-links=/wheels" in cmd or "/wheels" in cmd
    runs = [cmd for stage in BUILD_STAGES for r in stage.all("RUN") for cmd in _commands(r)]
    assert any(cmd[1:3] == ["-m", "venv"] and "/opt/venv" in cmd for cmd in runs)


def test_no_pip_install_without_no_cache_dir() -> None:
    commands = [cmd for stage in STAGES for cmd in _pip_commands(stage)]
    assert commands, "no pip command found: the parser missed them"
    for cmd in commands:
        assert "--no-cache-dir" in cmd, " ".join(cmd)


def test_runtime_installs_iptables_and_conntrack_and_cleans_apt_lists() -> None:
    apt_runs = [r for r in FINAL.all("RUN") if "apt-get" in r.args]
    assert len(apt_runs) == 1, "one RUN: update, install and cleanup in the same layer"
    commands = _commands(apt_runs[0])
    installs = [c for c in commands if c[:2] == ["apt-get", "install"]]
    assert len(installs) == 1
    install = installs[0]
    assert "--no-install-recommends" in install
    assert "-y" in install or "--yes" in install
    packages = {w for w in install[2:] if not w.startswith("-")}
    assert packages == {"iptables", "conntrack"}
    assert ["apt-get", "update"] in commands
    assert commands.index(["apt-get", "update"]) < commands.index(install)
    cleanup = ["rm", "-rf", "/var/lib/apt/lists/*"]
    assert cleanup in commands
    assert commands.index(cleanup) > commands.index(install)


BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|make|build-essential|python3?-dev|libffi-dev|libssl-dev|cargo|rustc)\b"
)


def test_runtime_has_no_build_tools_sources_or_wheels() -> None:
    for run in FINAL.all("RUN"):
        assert not BUILD_TOOLS.search(run.args), run.args
        assert "pip" not in run.args, "nothing is pip-installed in the runtime stage"
    copies = FINAL.all("COPY") + FINAL.all("ADD")
    assert copies, "the runtime gets the venv from the build stage"
    for copy in copies:
        words = copy.args.split()
        assert words[0].startswith("--from="), f"runtime copies only from a stage: {copy.args}"
        assert words[1:] == ["/opt/venv", "/opt/venv"], copy.args


def test_entrypoint_is_nmi() -> None:
    (entrypoint,) = FINAL.all("ENTRYPOINT")
    assert json.loads(entrypoint.args) == ["/opt/venv/bin/nmi"]
    assert PYPROJECT["project"]["scripts"]["nmi"] == "nmi.cli:main"
    assert not FINAL.all("CMD"), "arguments come from the DaemonSet"


def test_runs_as_root() -> None:
    """uid 0 (the DaemonSet then drops every capability but NET_ADMIN and NET_RAW)."""
    users = FINAL.all("USER")
    assert [u.args for u in users] == ["0"]


def test_oci_labels() -> None:
    labels: dict[str, str] = {}
    for label in FINAL.all("LABEL"):
        for item in shlex.split(label.args):
            key, _, value = item.partition("=")
            labels[key] = value
    args = dict(a.args.partition("=")[::2] for a in FINAL.all("ARG"))
    for key in ("title", "description", "version", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    version = _substitute(labels["org.opencontainers.image.version"], args)
    assert version == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]


def test_runtime_environment() -> None:
    env = " ".join(e.args for e in FINAL.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "the root filesystem is read-only"
    assert "/opt/venv/bin" in env


# --------------------------------------------------------------------------- .dockerignore


def _ignore_patterns() -> list[str]:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        candidates = [pat, pat.removeprefix("**/")]
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatch(p, c) for c in candidates for p in prefixes)
        if pat.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(part, pat[3:]) for part in parts)
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_excludes_local_clutter() -> None:
    patterns = _ignore_patterns()
    for path in (".venv", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"):
        assert _ignored(path, patterns), path
    assert _ignored("nmi/kube/__pycache__/objects.cpython-311.pyc", patterns)
    assert _ignored(".venv/bin/python", patterns)


def _distribution_packages() -> list[str]:
    """Top-level packages of the distribution, as setuptools' ``find`` selects them."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").exists() and any(fnmatch.fnmatchcase(p.name, i) for i in include)
    )


def test_dockerignore_keeps_what_the_wheel_needs() -> None:
    patterns = _ignore_patterns()
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"]]
    packages = _distribution_packages()
    assert packages == ["iptables", "nmi"]
    needed += [f"{p}/__init__.py" for p in packages]
    for path in needed:
        assert not _ignored(path, patterns), f"{path} is needed by `pip wheel .`"
    assert _ignored("nmi_sandbox/kube/server.py", patterns), "the emulators stay out of the build"


def _build_context(into: Path) -> None:
    """Copy what `docker build` would send: the repository minus .dockerignore."""
    patterns = _ignore_patterns()
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT).as_posix()
        if path.is_dir() or _ignored(relative, patterns):
            continue
        if any(_ignored(parent.as_posix(), patterns) for parent in Path(relative).parents):
            continue
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())


def test_the_wheel_in_the_image_carries_no_emulators(tmp_path: Path) -> None:
    """`pip wheel .` as the Dockerfile runs it, on the build context: nmi and iptables only."""
    context, out = tmp_path / "context", tmp_path / "wheels"
    _build_context(context)
    assert not (context / "nmi_sandbox").exists()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(context), "-w", str(out)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    [wheel] = out.glob("nmi-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    tops = {n.split("/")[0] for n in names if not n.startswith("nmi-")}
    assert tops == {"nmi", "iptables"}, tops
    assert "nmi/cli.py" in names and "nmi/imds/routes.py" in names
    assert not [n for n in names if "sandbox" in n or "testing" in n or "emulat" in n]
    runtime = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    lowered = " ".join(runtime).lower()
    assert "pyjwt" not in lowered and "pyyaml" not in lowered, runtime
    assert "msal" in lowered and "azure-mgmt-core" in lowered and "azure-identity" in lowered
    assert "azure-mgmt-compute" not in lowered  # a test dependency only (its models: 20 MB)
