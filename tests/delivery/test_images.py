"""Static checks of the container images (images/): no Docker engine here, so the Dockerfiles are read.

What must hold for `docker build` to work and the result to be safe: every COPY source exists and enters
the build context (.dockerignore), base images are pinned, the final user is a numeric non-root UID, the
entry-point modules exist, every pip install is pinned and agrees with pyproject.toml, and the
dependency lock is the whole runtime closure of the project.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "images"  # not docker/: a top-level folder of that name shadows the docker package kfp.local imports
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
LOCK = DOCKER / "requirements.lock"
NPU_LOCK = DOCKER / "requirements-npu.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# -- reading Dockerfiles ----------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments dropped."""
    out, parts = [], []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            word, _, rest = " ".join(parts).partition(" ")
            out.append((word.upper(), rest.strip()))
            parts = []
    assert not parts, f"{path.name}: a continuation line runs past the end of the file"
    return out


def stages(path: Path) -> list[dict]:
    """The build stages: their base image (ARG defaults substituted), name and instructions."""
    args: dict[str, str] = {}
    found: list[dict] = []
    for word, rest in instructions(path):
        if word == "ARG" and not found:  # ARGs before the first FROM parameterize FROM lines
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], parts[0])
            found.append({"image": image, "name": parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None, "steps": []})
        else:
            assert found, f"{path.name}: {word} before the first FROM"
            found[-1]["steps"].append((word, rest))
    return found


def built_tags() -> dict[str, Path]:
    """Image name -> the Dockerfile whose build command (its header comment) tags it."""
    return {tag: path for path in DOCKERFILES for tag in re.findall(r"^#.*?\s-t (\S+)", path.read_text(), flags=re.M)}


def final_user(path: Path) -> str:
    """The USER the image runs as (the final stage's last USER), "" when none."""
    users = [rest for word, rest in stages(path)[-1]["steps"] if word == "USER"]
    return users[-1] if users else ""


def dockerignore_excludes(rel: str) -> bool:
    """Docker's rule for a path of the build context: the last .dockerignore pattern that matches the
    path or one of its parent folders decides; `!` re-includes."""

    def regex(pattern: str) -> re.Pattern:
        out = (
            re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        )
        return re.compile(out + "$")

    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if any(regex(line.lstrip("!")).match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerfiles_are_there():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.component", "Dockerfile.npu", "Dockerfile.serving"}


# -- the checks -------------------------------------------------------------------------------------


def tracked_files(folder: str) -> list[str]:
    """Paths (relative to the repository) of the files git tracks or would track under `folder`."""
    command = ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", folder]
    listed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return [line for line in listed.stdout.splitlines() if (REPO / line).is_file()]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(path):
    for stage in stages(path):
        for word, rest in stage["steps"]:
            if word not in ("COPY", "ADD") or "--from=" in rest:
                continue
            assert word == "COPY", f"{path.name}: ADD fetches or unpacks implicitly; use COPY"
            *sources, _dest = [p for p in shlex.split(rest) if not p.startswith("--")]
            for source in sources:
                where = REPO / source
                assert where.exists(), f"{path.name}: COPY {source}: no such path in the repository"
                # the repository's files: build leftovers and local run data (git-ignored, e.g. the feature store
                # a local demo run writes) stay out of the image on purpose
                files = [where] if where.is_file() else [REPO / f for f in tracked_files(source)]
                assert files, f"{path.name}: COPY {source} is empty"
                for f in files:
                    rel = f.relative_to(REPO).as_posix()
                    assert not dockerignore_excludes(rel), (
                        f"{path.name}: COPY {source}: .dockerignore leaves {rel} out of the build context"
                    )


def test_dockerignore_keeps_the_context_small():
    for rel in (
        ".venv/bin/python",
        "runs/demo/RESULTS.md",
        ".git/HEAD",
        "tests/conftest.py",
        "model_src/gts_lum/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignore_excludes(rel), f".dockerignore lets {rel} into the build context"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path):
    names = set()
    for stage in stages(path):
        image = stage["image"]
        if image in names:  # an earlier stage of this file
            continue
        ref, _, digest = image.partition("@")
        last = ref.rsplit("/", 1)[-1]
        tag = last.partition(":")[2]
        assert digest.startswith("sha256:") or tag, f"{path.name}: FROM {image}: pin an exact tag or a digest"
        assert tag != "latest" and not re.fullmatch(r"\d+(\.\d+)?", tag or "0.0.0"), f"{path.name}: FROM {image}: a moving tag"
        if stage["name"]:
            names.add(stage["name"])


def test_the_serving_image_builds_on_the_components_image():
    from components import IMAGE

    (serving,) = stages(DOCKER / "Dockerfile.serving")
    assert serving["image"] == IMAGE, "Dockerfile.serving must start from the components' image (components.IMAGE)"
    assert built_tags()[IMAGE].name == "Dockerfile.component"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_final_user_is_numeric_and_not_root(path):
    user = final_user(path)
    assert user, f"{path.name}: no USER in the final stage: the container would run as root"
    uid, _, gid = user.partition(":")
    # numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
    assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {user}: use a numeric non-zero UID"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"{path.name}: USER {user}: a numeric non-zero GID"
    assert len({final_user(p) for p in DOCKERFILES}) == 1, "the images run as different users: the manifests assume one"
    created = " ".join(rest for word, rest in stages(path)[-1]["steps"] if word == "RUN")
    if "useradd" in created:
        assert f"--uid {uid}" in created, f"{path.name}: useradd creates another UID than USER {uid}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entry_point_modules_exist(path):
    final = stages(path)[-1]
    commands = [json.loads(rest) for word, rest in final["steps"] if word in ("ENTRYPOINT", "CMD")]
    assert commands and any(commands), f"{path.name}: neither ENTRYPOINT nor CMD"
    for command in commands:
        assert isinstance(command, list), f"{path.name}: use the exec (JSON) form so signals reach Python"
        if "-m" in command:
            module = command[command.index("-m") + 1]
            if module == "gts_lum.serving.scorer" and importlib.util.find_spec(module) is None:
                pytest.skip("gts_lum.serving.scorer is not written yet (the scorer lands separately)")
            assert importlib.util.find_spec(module) is not None, f"{path.name}: `python -m {module}`: no such module"


def _pip_requirements(path: Path) -> list[tuple[str, str]]:
    """(requirement, the RUN line) for every package named on a `pip install` line (options, paths and
    -r files left out)."""
    out = []
    for stage in stages(path):
        for word, rest in stage["steps"]:
            if word != "RUN":
                continue
            for command in re.split(r"&&|;", rest):
                tokens = shlex.split(command)
                if tokens[:2] != ["pip", "install"]:
                    continue
                skip_next = False
                for token in tokens[2:]:
                    if skip_next:
                        skip_next = False
                    elif token in ("-r", "--requirement", "-c", "--constraint", "--index-url", "--extra-index-url"):
                        skip_next = True
                    elif not token.startswith("-") and not token.startswith(("/", ".")):
                        out.append((token, command.strip()))
    return out


def _pyproject_specs() -> dict[str, Requirement]:
    return {canonicalize_name(Requirement(d).name): Requirement(d) for d in PYPROJECT["project"]["dependencies"]}


def _dockerfile_pins(path: Path) -> dict[str, str]:
    """name -> version of every package a Dockerfile's `pip install` lines name (each must be pinned)."""
    pins = {}
    for token, line in _pip_requirements(path):
        req = Requirement(token)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        assert exact, f"{path.name}: `{line}`: {token} is not pinned (name==version)"
        pins[canonicalize_name(req.name)] = exact[0]
    return pins


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pip_installs_are_pinned_and_agree_with_pyproject(path):
    specs = _pyproject_specs()
    pins = _dockerfile_pins(path)
    for name, version in pins.items():
        if name == "torch" and path.name == "Dockerfile.npu":
            continue  # Ascend's torch replaces the pin on purpose (test_the_npu_image_pins_a_triple_of_ascends_table_with_its_own_lock)
        if name in specs:
            assert specs[name].specifier.contains(version, prereleases=True), (
                f"{path.name}: {name}=={version}, but pyproject.toml asks {specs[name]}"
            )
    text = path.read_text()
    for lock in re.findall(r"-r (\S+)", text):
        assert (REPO / "images" / Path(lock).name).exists(), f"{path.name}: -r {lock}: the lock is not in images/"


# Rows of Ascend's published matching table (Ascend Extension for PyTorch README): (CANN, torch, torch-npu).
# torch-npu releases outside it are built for other CANN lines and fail at import or at the first kernel.
ASCEND_TABLE = {
    ("8.5.0", "2.9.0", "2.9.0"),
    ("8.5.0", "2.8.0", "2.8.0.post2"),
    ("8.5.0", "2.7.1", "2.7.1.post2"),
    ("8.5.0", "2.6.0", "2.6.0.post5"),
    ("8.3.RC1", "2.8.0", "2.8.0"),
    ("8.3.RC1", "2.7.1", "2.7.1"),
    ("8.3.RC1", "2.6.0", "2.6.0.post3"),
}


def test_the_npu_image_pins_a_triple_of_ascends_table_with_its_own_lock():
    path = DOCKER / "Dockerfile.npu"
    cann = re.match(r"ascendai/cann:([^-]+)-", stages(path)[0]["image"]).group(1)
    npu_lock = _lock(NPU_LOCK)
    torch = _dockerfile_pins(path)["torch"]
    assert (cann, torch, npu_lock["torch-npu"]) in ASCEND_TABLE, (
        f"CANN {cann} / torch {torch} / torch-npu {npu_lock['torch-npu']} is not a row of Ascend's table"
    )
    assert npu_lock["torch"] == torch and f"-r /tmp/{NPU_LOCK.name}" in path.read_text()
    # the same runtime closure as the CPU image's lock but for torch; plus torch-npu and CANN's Python needs
    cpu_lock = _lock(LOCK)
    assert {k: v for k, v in npu_lock.items() if k != "torch"} == {
        **{k: v for k, v in cpu_lock.items() if k != "torch"},
        **{k: npu_lock[k] for k in set(npu_lock) - set(cpu_lock)},
    }
    assert set(npu_lock) - set(cpu_lock) == {"torch-npu", "decorator", "absl-py", "pathlib2"}
    assert _dockerfile_pins(DOCKER / "Dockerfile.component")["torch"] == cpu_lock["torch"] == "2.13.0", "the CPU image keeps torch 2.13"
    assert any(canonicalize_name(Requirement(r).name) == "torch-npu" for r in PYPROJECT["project"]["optional-dependencies"]["npu"])


def _lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        assert exact and len(req.specifier) == 1, f"{path.name} line {number}: {line!r} is not name==version"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name} line {number}: {name} pinned twice"
        pins[name] = exact[0]
    return pins


def test_the_lock_satisfies_pyproject():
    lock = _lock()
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in lock, f"{LOCK.name}: pyproject.toml dependency {name} is missing"
        assert req.specifier.contains(lock[name], prereleases=True), f"{LOCK.name}: {name}=={lock[name]} breaks pyproject.toml's {dep!r}"
    assert "gts-lum" not in lock


def test_the_lock_is_the_whole_runtime_closure():
    """Every package the project's runtime dependencies pull in (as installed here) is pinned; the image
    installs the lock with --no-deps, so a missing one would only show in `pip check` at build time."""
    lock = _lock()
    missing: dict[str, str] = {}
    seen: set[str] = set()
    todo = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: nothing to walk (pyproject's own deps are checked above)
        if name not in lock:
            missing[name] = dist.version
        for raw in dist.requires or []:
            sub = Requirement(raw)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    assert not missing, f"{LOCK.name} lacks packages of the runtime closure; add: " + " ".join(
        f"{n}=={v}" for n, v in sorted(missing.items())
    )
