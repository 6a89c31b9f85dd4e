"""Drift test: every embdim command line shipped in docker/ parses with the real CLI.

Sources: the Dockerfiles (ENTRYPOINT/CMD, and any ``embdim`` / ``python -m embdim.launch.main`` in RUN
lines) and the Kubernetes manifests in docker/k8s (each container's ``command``/``args``, written
as JSON-style flow lists so they can be read without a YAML library; the image's ENTRYPOINT is
``embdim``, so ``args`` alone is an embdim command line). Each argv is parsed by
``launch.main.build_parser()``; for ``embdim launch ... -- SUB ARGS`` the SUB ARGS are parsed by the
same parser, the torchrun argv is built (multi-node manifests must not fall back to
``--standalone``), and the subcommand's config file plus ``--set`` overrides are loaded. Kubernetes
``$(VAR)`` placeholders are replaced with a dummy value first. The manifests' replica counts,
nprocPerNode and rendezvous endpoint must agree with the flags.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from embdim.launch.launcher import torchrun_argv
from embdim.launch.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
K8S = sorted((ROOT / "docker" / "k8s").glob("*.yaml"))
IMAGE_WORKDIR = "/opt/embdim"  # WORKDIR of both images: the repository root inside the image
PLACEHOLDER = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class DriftError(AssertionError):
    """A shipped command line that the CLI would reject (or that would not do what it says)."""


# ------------------------------------------------------------------------------------------ checker
def _parse(argv: list[str], where: str):
    parser = build_parser()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit as e:
        if e.code == 0 and ("--help" in argv or "-h" in argv):
            return None  # `embdim --help`: valid, prints usage
        raise DriftError(f"{where}: `embdim {shlex.join(argv)}` is rejected by the CLI: "
                         f"{err.getvalue().strip().splitlines()[-1:]}") from None


def _image_path(path: str) -> Path:
    """A path inside the image mapped back to the checkout (files COPY'd under WORKDIR)."""
    if path.startswith(IMAGE_WORKDIR + "/"):
        return ROOT / path[len(IMAGE_WORKDIR) + 1:]
    return Path(path)


def _check_subcommand(args, where: str) -> None:
    """Rank-level subcommands: the config file exists in the image and the --set keys are real."""
    if args.command_name not in ("train", "search", "retrain"):
        return
    from embdim.trainer.config import load_config

    cls = None
    if args.command_name in ("search", "retrain"):
        from embdim.trainer.phases import RunConfig

        cls = RunConfig
    config = None
    if args.config is not None:
        config = _image_path(args.config)
        if not config.is_file():
            raise DriftError(f"{where}: --config {args.config} is not in the image (no {config} in the checkout)")
    try:
        load_config(config, args.set, **({"cls": cls} if cls else {}))
    except ValueError as e:
        raise DriftError(f"{where}: config rejected: {e}") from None
    if args.command_name == "search":
        from embdim.embedding_methods import METHOD_NAMES

        if args.method not in METHOD_NAMES:
            raise DriftError(f"{where}: --method {args.method!r} is not one of {list(METHOD_NAMES)}")


def check_embdim_argv(argv: list[str], where: str, *, multi_node: bool = False) -> list[str]:
    """Parses an embdim argv like the CLI would; returns the torchrun argv for ``launch`` (else [])."""
    argv = [PLACEHOLDER.sub("0", a) for a in argv]
    args = _parse(argv, where)
    if args is None:
        return []
    if args.command_name is None:
        raise DriftError(f"{where}: `embdim {shlex.join(argv)}` names no subcommand")
    if args.command_name != "launch":
        _check_subcommand(args, where)
        return []
    try:
        torchrun = torchrun_argv(args)
    except ValueError as e:
        raise DriftError(f"{where}: {e}") from None
    sub = list(args.command)
    sub = sub[1:] if sub and sub[0] == "--" else sub
    sub_args = _parse(sub, f"{where} (after --)")
    if sub_args is None or sub_args.command_name is None:
        raise DriftError(f"{where}: launch needs a subcommand after --")
    _check_subcommand(sub_args, where)
    if multi_node and "--standalone" in torchrun:
        raise DriftError(f"{where}: multi-node launch would run --standalone (give --nnodes > 1 or an endpoint)")
    return torchrun


# ------------------------------------------------------------------------------------------ sources
def _flow_list(text: str, start: int, where: str) -> list[str]:
    """The JSON-style flow list ``[...]`` starting at ``text[start]`` (may span lines)."""
    depth, i, in_string = 0, start, False
    while i < len(text):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                break
        i += 1
    try:
        value = json.loads(text[start:i + 1])
    except json.JSONDecodeError as e:
        raise DriftError(f"{where}: write command/args as a JSON-style flow list of double-quoted strings: {e}")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DriftError(f"{where}: command/args must be a list of strings")
    return value


def yaml_documents(text: str) -> list[str]:
    return [d for d in re.split(r"(?m)^---\s*$", text) if d.strip()]


def container_argvs(doc: str, where: str) -> list[list[str]]:
    """The embdim argv of every container in a manifest document (by its `args`/`command` lists)."""
    argvs = []
    # Each container starts with `- name:`; its command/args follow before the next container.
    for block in re.split(r"(?m)^\s*- name:\s*\S+\s*$", doc)[1:]:
        lists = {}
        for m in re.finditer(r"(?m)^[ \t]*-?[ \t]*(command|args):[ \t]*(\S?)", block):
            if m.group(2) != "[":
                raise DriftError(f"{where}: {m.group(1)} must be a flow list on its line ([\"...\", ...])")
            lists[m.group(1)] = _flow_list(block, m.start(2), where)
        if not lists:
            continue
        command = lists.get("command")
        argv = lists.get("args", [])
        if command is not None:
            if command[:1] == ["embdim"]:
                argv = command[1:] + argv
            elif command[:3] == ["python", "-m", "embdim.launch.main"]:
                argv = command[3:] + argv
            else:
                continue  # not an embdim container
        argvs.append(argv)
    return argvs


def dockerfile_argvs(path: Path) -> list[tuple[str, list[str]]]:
    """(label, argv) for CMD (after ENTRYPOINT embdim) and embdim calls in RUN lines."""
    text = re.sub(r"\\\n", " ", path.read_text())  # join continuation lines
    found = []
    entrypoint = None
    for line in text.splitlines():
        m = re.match(r"\s*(ENTRYPOINT|CMD|RUN)\s+(.*)$", line)
        if not m:
            continue
        kind, rest = m.groups()
        if kind in ("ENTRYPOINT", "CMD"):
            argv = json.loads(rest) if rest.strip().startswith("[") else shlex.split(rest)
            if kind == "ENTRYPOINT":
                entrypoint = argv
            else:
                found.append(("CMD", argv))
            continue
        for part in re.split(r"&&|\|\||;", rest):
            words = shlex.split(part)
            if words[:1] == ["embdim"]:
                found.append(("RUN", words[1:]))
            elif words[:3] == ["python", "-m", "embdim.launch.main"]:
                found.append(("RUN", words[3:]))
    if entrypoint != ["embdim"]:
        raise DriftError(f"{path}: ENTRYPOINT {entrypoint} is not [\"embdim\"]; the manifests rely on it")
    return found


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _int_field(doc: str, key: str) -> list[int]:
    return [int(v) for v in re.findall(rf"(?m)^\s*{key}:\s*\"?(\d+)\"?\s*$", doc)]


def _str_field(doc: str, key: str) -> list[str]:
    return re.findall(rf"(?m)^\s*{key}:\s*\"?([^\s\"#]+)\"?", doc)


# ------------------------------------------------------------------------------------------ tests
def test_sources_exist():
    assert all(p.is_file() for p in DOCKERFILES)
    names = {p.name for p in K8S}
    assert {"pytorchjob.yaml", "indexed-job.yaml"} <= names, names


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_commands_parse(path):
    found = dockerfile_argvs(path)
    assert any(label == "CMD" for label, _ in found)
    for label, argv in found:
        check_embdim_argv(argv, f"{path.name} {label}")
    # What the image copies must exist, and project modules it imports must import.
    for src in re.findall(r"(?m)^COPY\s+(.+)\s+\S+\s*$", path.read_text()):
        for item in src.split():
            assert (ROOT / item).exists(), f"{path.name}: COPY {item}: not in the checkout"
    for modules in re.findall(r'python -c "import ([\w., ]+)"', path.read_text()):
        for module in (m.strip() for m in modules.split(",")):
            if (ROOT / module.split(".")[0]).is_dir():
                __import__(module)


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_manifest_commands_parse(path):
    docs = yaml_documents(path.read_text())
    checked = 0
    for i, doc in enumerate(docs):
        kind = (_str_field(doc, "kind") or ["?"])[0]
        name = (_str_field(doc, "name") or ["?"])[0]
        where = f"{path.name} [{i}] {kind}/{name}"
        argvs = container_argvs(doc, where)
        if kind in ("PyTorchJob", "Job"):
            assert argvs, f"{where}: no embdim container command found"
            assert "NCCL_NVLS_ENABLE" in doc and "nvidia.com/gpu" in doc, where
        for argv in argvs:
            torchrun = check_embdim_argv(argv, where, multi_node=True)
            assert torchrun, f"{where}: a multi-node manifest must run `embdim launch`"
            checked += 1
            nnodes = int(_flag(argv, "--nnodes"))
            nproc = _flag(argv, "--nproc-per-node")
            if kind == "PyTorchJob":
                assert "apiVersion: kubeflow.org/v1" in doc and re.search(r"-\s*name:\s*pytorch\s*$", doc, re.M)
                assert _str_field(doc, "rdzvBackend") == ["c10d"], where
                assert _str_field(doc, "nprocPerNode") == [nproc], f"{where}: nprocPerNode != --nproc-per-node"
                # The operator's webhook: exactly one Master; spec.nprocPerNode, not elasticPolicy.nProcPerNode.
                assert re.search(r"(?m)^\s*Master:\s*\n\s*replicas:\s*1\s*$", doc), f"{where}: Master replicas must be 1"
                assert "nProcPerNode" not in doc, f"{where}: elasticPolicy.nProcPerNode is deprecated"
                replicas = sum(_int_field(doc, "replicas"))
                assert replicas == nnodes, f"{where}: Master + Worker replicas {replicas} != --nnodes {nnodes}"
                assert _int_field(doc, "minReplicas") == _int_field(doc, "maxReplicas") == [nnodes], where
            if kind == "Job":
                assert _str_field(doc, "completionMode") == ["Indexed"], where
                assert _int_field(doc, "completions") == _int_field(doc, "parallelism") == [nnodes], where
                assert _flag(argv, "--node-rank") == "$(JOB_COMPLETION_INDEX)", where
                assert _flag(argv, "--rdzv-backend") == "c10d", where
                subdomain = _str_field(doc, "subdomain")[0]
                host, port = _flag(argv, "--rdzv-endpoint").rsplit(":", 1)
                assert host == f"{name}-0.{subdomain}", f"{where}: endpoint {host} is not <job>-0.<subdomain>"
                services = [d for d in docs if _str_field(d, "kind")[:1] == ["Service"]
                            and _str_field(d, "name")[:1] == [subdomain]]
                if not services:  # a separate service.yaml
                    services = [d for p in K8S for d in yaml_documents(p.read_text())
                                if _str_field(d, "kind")[:1] == ["Service"] and _str_field(d, "name")[:1] == [subdomain]]
                assert len(services) == 1, f"{where}: no headless Service named {subdomain!r}"
                assert "clusterIP: None" in services[0] and f"port: {port}" in services[0], where
    assert checked or not any(_str_field(d, "kind")[:1] in (["PyTorchJob"], ["Job"]) for d in docs)


# ------------------------------------------------------------------------------------------ the checker can fail
GOOD = ["launch", "--nproc-per-node", "8", "--nnodes", "2", "--", "train", "--data", "/d", "--out", "/r"]


@pytest.mark.parametrize("argv, match", [
    pytest.param(["launch", "--nproc-per-node", "8", "--nodes", "2", "--", "train", "--data", "/d", "--out", "/r"],
                 "rejected", id="unknown-launch-flag"),
    pytest.param(["launch", "--nproc-per-node", "8", "--nnodes", "2", "--", "train", "--dataset", "/d", "--out", "/r"],
                 "rejected", id="unknown-subcommand-flag"),
    pytest.param(["launch", "--nproc-per-node", "8", "--nnodes", "2", "--", "fit", "--data", "/d"],
                 "rejected", id="unknown-subcommand"),
    pytest.param(["launch", "--nproc-per-node", "0", "--nnodes", "2", "--", "train", "--data", "/d", "--out", "/r"],
                 "rejected", id="bad-nproc"),
    pytest.param(["launch", "--nproc-per-node", "8", "--", "train", "--data", "/d", "--out", "/r"],
                 "standalone", id="multi-node-without-nnodes"),
    pytest.param(["launch", "--nproc-per-node", "8", "--nnodes", "2", "--", "demo", "--out", "/r"],
                 "cannot run under the launcher", id="launch-demo"),
    pytest.param(["launch", "--nproc-per-node", "8", "--nnodes", "2", "--", "search", "--data", "/d", "--method",
                  "autodim", "--out", "/r"], "not one of", id="unknown-method"),
    pytest.param(["launch", "--nproc-per-node", "8", "--nnodes", "2", "--", "train", "--data", "/d", "--out", "/r",
                  "--set", "train.epoch=2"], "config rejected", id="unknown-set-key"),
    pytest.param(["launch", "--nproc-per-node", "8", "--nnodes", "2", "--", "train", "--data", "/d", "--out", "/r",
                  "--config", "/opt/embdim/configs/nope.toml"], "not in the image", id="missing-config"),
    pytest.param(["train", "--data", "/d"], "rejected", id="missing-required-flag"),
])
def test_checker_rejects_drifted_commands(argv, match):
    check_embdim_argv(GOOD, "good", multi_node=True)  # the same checker accepts the right spelling
    with pytest.raises(DriftError, match=match):
        check_embdim_argv(argv, "bad", multi_node=True)


def test_manifest_reader_finds_a_drifted_flag():
    doc = """
kind: Job
spec:
  template:
    spec:
      containers:
        - name: embdim
          image: embdim:cuda
          args: ["launch", "--nproc-per-node", "8", "--nnodes", "2",
                 "--", "train", "--data", "/data", "--output", "/runs"]
"""
    (argv,) = container_argvs(doc, "inline")
    assert argv[-2:] == ["--output", "/runs"]
    with pytest.raises(DriftError, match="rejected"):
        check_embdim_argv(argv, "inline", multi_node=True)
    with pytest.raises(DriftError, match="flow list"):
        container_argvs(doc.replace('args: ["launch",', 'args:\n            - "launch",'), "inline")
