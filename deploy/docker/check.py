#!/usr/bin/env python3
"""Checks the images' Dockerfiles where no container engine runs (scripts/deploy/10-dockerfiles.sh).

    python3 deploy/docker/check.py               # check deploy/docker/*.Dockerfile
    python3 deploy/docker/check.py --self-test   # and prove that broken copies fail

Each Dockerfile must: have several stages; name every base image by digest or by an exact
version tag (or `scratch`); end in a stage with a non-root USER and a HEALTHCHECK; COPY only
files that exist in the repository and that .dockerignore lets into the context (no ADD);
copy every workspace member; build its binary with scripts/release.sh (so the image's cargo
invocation is the release's, `release.sh --print-build`) and no cargo build of its own; install
the cargo-cyclonedx version the release script pins; install the binary as /usr/local/bin/<name>;
and say at the top which user, ports or network, volumes and environment it has.

Debian packages no Dockerfile linter (hadolint is not in it), so this reads the files itself:
the subset of the syntax our Dockerfiles use (instructions, continuation lines, comments, JSON
or shell form), and it refuses what it does not understand rather than passing it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES = {"gateway.Dockerfile": "gateway", "node-runner.Dockerfile": "node-runner"}
# What the header comment of each Dockerfile must speak of.
HEADER_TOPICS = ["User", "Env", "Health", "Volume", "Runtime base"]


class Broken(Exception):
    """A Dockerfile that does not pass, with the reason."""


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined, comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # a comment, even inside a continued instruction, as Docker reads it
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        if not re.fullmatch(r"[A-Za-z]+", keyword):
            raise Broken(f"line {start}: cannot read {joined!r}")
        if "<<" in args and keyword.upper() in ("RUN", "COPY"):
            raise Broken(f"line {start}: heredocs are not understood by this check")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
    if pending:
        raise Broken("the file ends inside a continued instruction")
    return instructions


def stages(instructions: list[Instruction]) -> list[tuple[Instruction, list[Instruction]]]:
    result: list[tuple[Instruction, list[Instruction]]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append((instruction, []))
        elif not result:
            if instruction.keyword != "ARG":
                raise Broken(f"line {instruction.line}: {instruction.keyword} before any FROM")
        else:
            result[-1][1].append(instruction)
    return result


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """`--from=build a b c` as ({"from": "build"}, ["a", "b", "c"]); JSON form too."""
    flags: dict[str, str] = {}
    words = args.split()
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    rest = " ".join(words)
    if rest.startswith("["):
        try:
            return flags, [str(w) for w in json.loads(rest)]
        except json.JSONDecodeError as error:
            raise Broken(f"not a JSON array: {rest!r} ({error})") from None
    return flags, words


def pinned(image: str, stage_names: set[str]) -> bool:
    """An image named so that a rebuild gets the same one: a digest, or an exact version tag."""
    if image == "scratch" or image in stage_names:
        return True
    if "$" in image:
        return False
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return False  # no tag at all (`debian`, or a registry port's colon)
    # A release number with a dot (1.95.0, 12.12), not `latest`, `bookworm-slim` or `1`.
    return re.match(r"v?\d+\.\d+", tag) is not None


class DockerIgnore:
    """The context's exclusions as Docker reads .dockerignore: the last matching pattern wins,
    `!` lets a path back in, and a path is excluded when it or a folder above it is."""

    def __init__(self, text: str):
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line[1:].strip() if include else line
            pattern = pattern.strip("/")
            self.rules.append((include, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return out + "$"

    def excluded(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            verdict = None
            for include, regex in self.rules:
                if regex.match(prefix):
                    verdict = not include
            if verdict:
                return True
        return False


def release_script() -> tuple[str, str]:
    """The release script's pinned cargo-cyclonedx version, and its text."""
    text = (REPO / "scripts/release.sh").read_text()
    found = re.search(r"^CARGO_CYCLONEDX_VERSION=(\S+)$", text, re.M)
    if not found:
        raise Broken("scripts/release.sh pins no CARGO_CYCLONEDX_VERSION")
    return found.group(1), text


def check(dockerfile: Path, binary: str, context: Path = REPO) -> list[str]:
    """Checks one Dockerfile against the repository at `context`; returns what it verified."""
    text = dockerfile.read_text()
    header = "\n".join(l for l in text.splitlines()[:40] if l.startswith("#"))
    for topic in HEADER_TOPICS:
        if topic not in header:
            raise Broken(f"the header comment does not say the image's {topic}")
    if "Port" not in header and "Network" not in header:
        raise Broken("the header comment says neither its ports nor its network")
    all_stages = stages(parse(text))
    if len(all_stages) < 2:
        raise Broken("single stage: the toolchain would ship in the image (want a build stage)")
    names: set[str] = set()
    for from_, _ in all_stages:
        flags, words = split_flags(from_.args)
        image = words[0] if words else ""
        if not pinned(image, names):
            raise Broken(f"line {from_.line}: base image {image!r} is not pinned by digest or exact tag")
        if len(words) == 3 and words[1].upper() == "AS":
            names.add(words[2])
    final_from, final = all_stages[-1]

    users = [i for i in final if i.keyword == "USER"]
    if not users:
        raise Broken("the final stage has no USER: it would run as root")
    user = users[-1].args.split(":")[0]
    if user in ("root", "0", ""):
        raise Broken(f"line {users[-1].line}: the final stage runs as root ({users[-1].args})")
    checks = [i for i in final if i.keyword == "HEALTHCHECK"]
    if not checks or checks[-1].args.upper().startswith("NONE") or " CMD " not in f" {checks[-1].args} ":
        raise Broken("the final stage has no HEALTHCHECK with a CMD")

    ignore = DockerIgnore((context / ".dockerignore").read_text() if (context / ".dockerignore").exists() else "")
    copied: list[str] = []
    for from_, body in all_stages:
        for instruction in body:
            if instruction.keyword == "ADD":
                raise Broken(f"line {instruction.line}: ADD (it fetches URLs and unpacks archives): use COPY")
            if instruction.keyword != "COPY":
                continue
            flags, words = split_flags(instruction.args)
            if "from" in flags:
                continue
            if len(words) < 2:
                raise Broken(f"line {instruction.line}: COPY needs a source and a destination")
            for source in words[:-1]:
                if any(c in source for c in "*?["):
                    raise Broken(f"line {instruction.line}: wildcard COPY source {source!r}")
                if not (context / source).exists():
                    raise Broken(f"line {instruction.line}: COPY source {source!r} is not in the repository")
                if ignore.excluded(source):
                    raise Broken(f"line {instruction.line}: COPY source {source!r} is excluded by .dockerignore")
                copied.append(source.strip("/").removeprefix("./"))

    workspace = tomllib.loads((context / "Cargo.toml").read_text())["workspace"]
    needed = ["Cargo.toml", "Cargo.lock", "rust-toolchain.toml", "scripts/release.sh"]
    for path in needed + workspace["members"]:
        if not any(path == c or path.startswith(c + "/") for c in copied):
            raise Broken(f"{path} is not copied into the build (every workspace member must be)")

    version, _ = release_script()
    build_runs = [i for _, body in all_stages[:-1] for i in body if i.keyword == "RUN"]
    for run in build_runs + [i for i in final if i.keyword == "RUN"]:
        if re.search(r"\bcargo\s+(build|rustc|install\s+--path)\b", run.args):
            raise Broken(f"line {run.line}: a cargo build of its own: build with scripts/release.sh")
    release_runs = [r for r in build_runs if re.search(r"(^|\s)scripts/release\.sh\s", r.args)]
    if not release_runs:
        raise Broken("no RUN scripts/release.sh in a build stage")
    if len(release_runs) != 1:
        raise Broken("more than one RUN scripts/release.sh: build the image's binary once")
    words = release_runs[0].args.split()
    words = words[words.index("scripts/release.sh") + 1:]
    if "--out" not in words or words.index("--out") + 1 >= len(words):
        raise Broken(f"line {release_runs[0].line}: scripts/release.sh without --out DIR")
    out = words[words.index("--out") + 1]
    del words[words.index("--out"):words.index("--out") + 2]
    # What the release script itself says it would run for these arguments.
    printed = subprocess.run(
        [str(context / "scripts/release.sh"), "--print-build", *words],
        capture_output=True, text=True,
    )
    if printed.returncode != 0:
        raise Broken(f"line {release_runs[0].line}: scripts/release.sh refuses {' '.join(words)}: "
                     f"{printed.stderr.strip().splitlines()[0] if printed.stderr.strip() else printed.returncode}")
    commands = printed.stdout.strip().splitlines()
    if len(commands) != 1 or not commands[0].endswith(f" --bin {binary}"):
        raise Broken(f"line {release_runs[0].line}: scripts/release.sh builds {commands}, not {binary} alone")

    args = {}
    for from_, body in all_stages[:-1]:
        for instruction in body:
            if instruction.keyword == "ARG" and "=" in instruction.args:
                name, _, value = instruction.args.partition("=")
                args[name.strip()] = value.strip().strip('"')
    if args.get("CARGO_CYCLONEDX_VERSION") != version:
        raise Broken(
            f"the build installs cargo-cyclonedx {args.get('CARGO_CYCLONEDX_VERSION')!r}, "
            f"scripts/release.sh pins {version}"
        )

    installed = False
    for instruction in final:
        if instruction.keyword == "COPY":
            flags, words = split_flags(instruction.args)
            if flags.get("from") and words[-1] == f"/usr/local/bin/{binary}" and words[0] == f"{out}/{binary}":
                installed = True
    if not installed:
        raise Broken(f"the final stage does not COPY {out}/{binary} from the build to /usr/local/bin/{binary}")
    entry = [i for i in final if i.keyword == "ENTRYPOINT"]
    if not entry or split_flags(entry[-1].args)[1][:1] != [f"/usr/local/bin/{binary}"]:
        raise Broken(f"the ENTRYPOINT is not /usr/local/bin/{binary}")

    return [
        f"{len(all_stages)} stages, bases pinned: "
        + ", ".join(split_flags(f.args)[1][0] for f, _ in all_stages),
        f"runs as {users[-1].args}; health check: {checks[-1].args.split(' CMD ', 1)[-1]}",
        f"built by: {printed.stdout.strip()} (scripts/release.sh --out {out} {binary})",
    ]


# Ways to break a Dockerfile, each with the words its failure must contain.
MUTATIONS = [
    ("no USER", lambda t: re.sub(r"^USER .*$", "", t, flags=re.M), "no USER"),
    ("USER root", lambda t: re.sub(r"^USER .*$", "USER root", t, flags=re.M), "runs as root"),
    ("USER 0:0", lambda t: re.sub(r"^USER .*$", "USER 0:0", t, flags=re.M), "runs as root"),
    ("no HEALTHCHECK", lambda t: re.sub(r"^HEALTHCHECK .*\n(\s+CMD .*\n)?", "", t, flags=re.M), "no HEALTHCHECK"),
    ("HEALTHCHECK NONE", lambda t: re.sub(r"^HEALTHCHECK .*\n(\s+CMD .*\n)?", "HEALTHCHECK NONE\n", t, flags=re.M), "no HEALTHCHECK"),
    ("one stage", lambda t: t[:t.index("\n# ---- runtime")], "single stage"),
    ("base :latest", lambda t: t.replace("FROM rust:1.95.0-slim-bookworm", "FROM rust:latest"), "not pinned"),
    ("untagged base", lambda t: t.replace("FROM rust:1.95.0-slim-bookworm", "FROM rust"), "not pinned"),
    ("floating tag", lambda t: t.replace("FROM rust:1.95.0-slim-bookworm", "FROM rust:slim-bookworm"), "not pinned"),
    ("missing COPY source", lambda t: t.replace("COPY wit/ wit/", "COPY wit/ wit/\nCOPY nowhere/ nowhere/"), "not in the repository"),
    ("excluded COPY source", lambda t: t.replace("COPY wit/ wit/", "COPY wit/ wit/\nCOPY target/ target/"), "excluded by .dockerignore"),
    ("a member not copied", lambda t: t.replace("COPY cli/ cli/\n", ""), "cli is not copied"),
    ("ADD", lambda t: t.replace("COPY wit/ wit/", "ADD https://example.com/x.tar.gz /x"), "ADD"),
    ("own cargo build", lambda t: re.sub(r"RUN scripts/release\.sh --out /out (\S+)", r"RUN cargo build --release --bin \1", t), "cargo build of its own"),
    ("unknown artefact", lambda t: re.sub(r"(RUN scripts/release\.sh --out /out) (\S+)", r"\1 \2 --oops", t), "--oops"),
    ("other cyclonedx", lambda t: t.replace("ARG CARGO_CYCLONEDX_VERSION=", "ARG CARGO_CYCLONEDX_VERSION=9"), "cargo-cyclonedx"),
    ("binary elsewhere", lambda t: re.sub(r"/usr/local/bin/(gateway|node-runner)$", r"/opt/\1", t, count=1, flags=re.M), "/usr/local/bin/"),
    ("undocumented", lambda t: t.replace("# User ", "# Who  "), "User"),
    ("dangling continuation", lambda t: t.rstrip("\n") + " \\\n", "continued instruction"),
]


def self_test() -> None:
    """Every mutation of every Dockerfile must fail with its reason; an unchanged copy must pass."""
    with tempfile.TemporaryDirectory() as temp:
        context = Path(temp)
        for name in ["Cargo.toml", "Cargo.lock", "rust-toolchain.toml", ".dockerignore"]:
            shutil.copy(REPO / name, context / name)
        for folder in ["scripts", "deploy/docker"]:
            shutil.copytree(REPO / folder, context / folder)
        members = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["members"]
        for path in members + ["wit", "plugin-sdk", "target/debug"]:
            (context / path).mkdir(parents=True, exist_ok=True)
        for dockerfile, binary in IMAGES.items():
            original = (REPO / "deploy/docker" / dockerfile).read_text()
            copy = context / "deploy/docker" / dockerfile
            check(copy, binary, context)
            for what, mutate, expected in MUTATIONS:
                broken = mutate(original)
                if broken == original:
                    raise SystemExit(f"self-test: mutation {what!r} changed nothing in {dockerfile}")
                copy.write_text(broken)
                try:
                    check(copy, binary, context)
                except Broken as error:
                    if expected not in str(error):
                        raise SystemExit(f"self-test: {dockerfile} with {what}: failed for another reason: {error}")
                else:
                    raise SystemExit(f"self-test: {dockerfile} with {what} passed the check")
            copy.write_text(original)
        print(f"self-test: {len(MUTATIONS)} broken copies of each of {len(IMAGES)} Dockerfiles fail, each for its reason")


def main() -> int:
    failed = False
    for dockerfile, binary in IMAGES.items():
        path = REPO / "deploy/docker" / dockerfile
        try:
            for line in check(path, binary):
                print(f"{dockerfile}: {line}")
        except Broken as error:
            print(f"{dockerfile}: {error}", file=sys.stderr)
            failed = True
    if failed:
        return 1
    if "--self-test" in sys.argv[1:]:
        self_test()
    return 0


if __name__ == "__main__":
    sys.exit(main())
