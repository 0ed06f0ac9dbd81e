"""The import arrows point down (docs/architecture.md): the library never imports
its applications (training, the benchmark suites) or the command line; the
applications import the library only; the command line sits on top."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENTRY = {"flashcore/cli.py", "flashcore/cli_checks.py", "flashcore/cli_bench.py", "flashcore/cli_distill.py",
         "flashcore/__main__.py"}
APPS = ("flashcore.train", "flashcore.cli", "flashcore.__main__")


def imports(path: pathlib.Path) -> set[str]:
    """Every module name ``path`` imports (absolute, relative ones resolved), at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(ROOT)
    pkg = ("flashcore." + ".".join(rel.parts[1:-1])).rstrip(".") if rel.parts[0] == "flashcore" else \
        "flashcore.train" if rel.parts[0] == "train" else ""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def loads_files(path: pathlib.Path) -> bool:
    """Does the module import source files by path (importlib spec_from_file_location)?"""
    return "spec_from_file_location" in path.read_text()


def library_files():
    for p in sorted((ROOT / "flashcore").rglob("*.py")):
        if str(p.relative_to(ROOT)) not in ENTRY:
            yield p


def test_library_never_imports_applications_or_the_cli():
    bad = []
    for p in library_files():
        for m in imports(p):
            if m.startswith(APPS) or m.split(".")[0] in ("train", "bench"):
                bad.append(f"{p.relative_to(ROOT)} imports {m}")
        if loads_files(p):
            bad.append(f"{p.relative_to(ROOT)} loads source files by path")
    assert not bad, "\n".join(bad)


def test_applications_import_only_the_library():
    bad = []
    for p in sorted((ROOT / "train").glob("*.py")) + sorted((ROOT / "bench").glob("*.py")):
        for m in imports(p):
            if m.startswith(("flashcore.cli", "flashcore.__main__")):
                bad.append(f"{p.relative_to(ROOT)} imports {m}")
    assert not bad, "\n".join(bad)
