#!/usr/bin/env python3
"""The `use crate::` graph of each library crate, checked against its declared layers.

Reads every `crate::…` and `super::…` path in a crate's non-test code (a file's
`#[cfg(test)]` tail and files named `tests.rs` or `*_tests.rs` are test code), reduces each to the
top-level module it names, and checks three things:

  * the graph of top-level modules has no cycle;
  * no module imports one in a higher layer (LAYERS below, lowest first). A module
    may use modules of its own layer as long as that makes no cycle;
  * inside every folder, the files (sibling modules) import each other without a cycle
    either. A folder's `mod.rs` is its root: every file of the folder may name it, and it
    names its files, so it takes no part in that check.

A module missing from LAYERS is an error too, so a new module gets a place on purpose.

    scripts/module-graph.py            check every crate (CI runs this)
    scripts/module-graph.py --dot      print the coordinator's graph as Graphviz
    scripts/module-graph.py --list     print each module's imports
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest layer first. A module may import only what sits in its own or a lower layer.
LAYERS = {
    "coordinator": [
        # Leaves: no domain knowledge.
        ["clock", "secret", "accept", "metrics", "pki", "leader", "http_head", "store_health",
         "schema", "snapshot"],
        ["tls", "purge", "etcd_kv", "http_front", "tokens"],
        ["edges", "bundle", "traffic", "audit", "maintenance"],
        ["rollout", "monitor", "warm", "geo", "cluster", "fanout"],
        ["config"],
        ["state"],
        ["backup"],
        ["session", "api"],
        ["server", "fuzzing"],
    ],
    "edge-agent": [
        # The one module that spawns programs, and plain helpers.
        ["command", "synthetic", "served", "cursor", "why", "clients", "mark"],
        ["config"],
        ["stats", "top", "plan"],
        ["varnish"],
        ["vcl", "probe", "warm"],
        ["session"],
        ["fuzzing"],
    ],
    "warmer": [
        ["fetch", "pace", "sign", "sitemap"],
        ["error"],
        ["engine"],
        ["cli"],
    ],
    "coordinator-cli": [
        ["args", "cli", "demo", "maintenance"],
        ["run"],
    ],
}

PATH_RE = re.compile(r"\b(crate|super)((?:::(?:[A-Za-z_][A-Za-z0-9_]*|\{))+)")


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = []
    for line in text.splitlines():
        # Drop // comments (doc comments included) but keep strings intact enough.
        i = line.find("//")
        out.append(line if i < 0 else line[:i])
    return "\n".join(out)


def non_test_code(text: str) -> str:
    i = text.find("#[cfg(test)]")
    return text if i < 0 else text[:i]


def module_path(src: Path, file: Path) -> list:
    rel = file.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts


def braces_heads(text: str, start: int) -> list:
    """Top-level first segments inside the `{…}` that opens at text[start]."""
    depth, item, heads = 0, "", []
    for ch in text[start:]:
        if ch == "{":
            depth += 1
            if depth == 1:
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                heads.append(item)
                break
        if depth == 1 and ch == ",":
            heads.append(item)
            item = ""
        elif depth >= 1:
            item += ch
    return [h.strip().split("::")[0].strip() for h in heads if h.strip()]


def imports_of(src: Path, file: Path) -> set:
    here = module_path(src, file)
    text = strip_comments(non_test_code(file.read_text()))
    found = set()
    for m in PATH_RE.finditer(text):
        kind, rest = m.group(1), m.group(2)
        segs = [s for s in rest.split("::") if s]
        if kind == "super":
            base = here[:-1]
            # `super::super::x`
            while segs and segs[0] == "super":
                base = base[:-1]
                segs = segs[1:]
            if not base:
                if segs and segs[0] == "{":
                    found.update(braces_heads(text, m.end() - 1))
                elif segs:
                    found.add(segs[0])
            else:
                found.add(base[0])
            continue
        if segs and segs[0] == "{":
            found.update(braces_heads(text, m.end() - 1))
        elif segs:
            found.add(segs[0])
    found.discard("self")
    found.discard("")
    return found


def resolved_paths(src: Path, file: Path) -> list:
    """Every module path a file names, made absolute (`super`/`crate` resolved)."""
    here = module_path(src, file)
    text = strip_comments(non_test_code(file.read_text()))
    out = []
    for m in PATH_RE.finditer(text):
        kind, rest = m.group(1), m.group(2)
        segs = [s for s in rest.split("::") if s]
        if kind == "crate":
            base = []
        else:
            # `super` from a.rs is a's parent; from a/mod.rs it is a's parent too.
            base = here[:-1]
            while segs and segs[0] == "super":
                base = base[:-1]
                segs = segs[1:]
        if segs and segs[0] == "{":
            out += [base + [h] for h in braces_heads(text, m.end() - 1)]
        elif segs:
            out.append(base + [s for s in segs if s != "{"])
    return out


def folder_graphs(src: Path) -> dict:
    """For each folder with files, the import graph between its files (sibling modules)."""
    children = {}
    for file in src.rglob("*.rs"):
        path = module_path(src, file)
        if path:
            children.setdefault(tuple(path[:-1]), set()).add(path[-1])
    graphs = {}
    for file in sorted(src.rglob("*.rs")):
        if file.name.endswith("tests.rs") or "bin" in file.relative_to(src).parts:
            continue
        here = module_path(src, file)
        if not here:
            continue
        for target in resolved_paths(src, file):
            # The folder both live in: the longest common prefix.
            n = 0
            while n < min(len(here), len(target)) and here[n] == target[n]:
                n += 1
            if n >= len(here) or n >= len(target):
                continue  # a path into itself or to an ancestor (a folder's root)
            folder = tuple(here[:n])
            a, b = here[n], target[n]
            if b in children.get(folder, ()) and a != b:
                graphs.setdefault(folder, {}).setdefault(a, set()).add(b)
    return graphs


def crate_graph(crate_dir: Path) -> dict:
    src = crate_dir / "src"
    graph = {}
    for file in sorted(src.rglob("*.rs")):
        if file.name.endswith("tests.rs") or "bin" in file.relative_to(src).parts:
            continue
        path = module_path(src, file)
        if not path:
            continue  # lib.rs / main.rs: the root may name everything
        top = path[0]
        deps = {d for d in imports_of(src, file) if d != top}
        graph.setdefault(top, set()).update(deps)
    # Only edges to modules of this crate (a path like crate::Foo names a root item).
    mods = set(graph)
    return {m: {d for d in deps if d in mods} for m, deps in graph.items()}


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def check(name: str, graph: dict) -> list:
    errors = []
    layers = LAYERS.get(name)
    if layers is None:
        return [f"{name}: no layers declared in scripts/module-graph.py"]
    level = {m: i for i, layer in enumerate(layers) for m in layer}
    for m in sorted(graph):
        if m not in level:
            errors.append(f"{name}: module `{m}` has no layer (add it to LAYERS)")
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if m in level and d in level and level[d] > level[m]:
                errors.append(f"{name}: `{m}` (layer {level[m]}) imports `{d}` (layer {level[d]}), a higher layer")
    cycle = find_cycle(graph)
    if cycle:
        errors.append(f"{name}: import cycle: {' -> '.join(cycle)}")
    return errors


def crates():
    for toml in sorted(ROOT.glob("*/Cargo.toml")):
        d = toml.parent
        if (d / "src" / "lib.rs").exists() and d.name in LAYERS:
            yield d.name, d


def main() -> int:
    args = sys.argv[1:]
    if "--dot" in args or "--list" in args:
        which = next((a for a in args if not a.startswith("--")), "coordinator")
        graph = crate_graph(ROOT / which)
        if "--dot" in args:
            print(f'digraph "{which}" {{')
            for m, deps in sorted(graph.items()):
                for d in sorted(deps):
                    print(f"  {m} -> {d};")
            print("}")
        else:
            for m, deps in sorted(graph.items()):
                print(f"{m:10} -> {', '.join(sorted(deps)) or '-'}")
        return 0
    errors = []
    for name, d in crates():
        graph = crate_graph(d)
        errs = check(name, graph)
        for folder, g in sorted(folder_graphs(d / "src").items()):
            if not folder:
                continue  # the crate root: checked above, with layers
            cycle = find_cycle(g)
            if cycle:
                where = "/".join(folder)
                errs.append(f"{name}: import cycle inside {where}/: {' -> '.join(cycle)}")
        errors += errs
        edges = sum(len(v) for v in graph.values())
        print(f"{name}: {len(graph)} modules, {edges} imports, {'ok' if not errs else 'FAILED'}")
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
