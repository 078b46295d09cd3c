"""The structure docs/architecture.md describes, held against the code: no import circle, no
import from a lower layer to a higher one, no module over 600 lines, no function over 100
lines outside kernels/. Every import counts, those inside functions too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlakit"

# docs/architecture.md, "Layers": a module may import from its own layer or below
LAYERS = {
    1: ["errors", "options", "norm", "fused", "io", "quant", "kernels"],
    2: ["config", "rope", "cache"],
    3: ["attention", "model", "parallel"],
    4: ["loading", "speed", "engine", "elastic"],
    5: ["convert", "heal", "export", "bench", "report", "frontier", "checks", "evaluate", "passkey", "ood", "protocols",
        "commands.common", "testing"],
    6: ["cli", "commands", "__main__", "__init__"],
}
CLI_MODULES = ("heal.cli", "export.cli", "bench.cli", "convert.cli")  # each tool's own command module


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(name: str) -> int:
    if name.endswith(".cli") or name in CLI_MODULES or name in ("cli", "__main__", "__init__"):
        return 6
    parts = name.split(".")
    for n in range(len(parts), 0, -1):  # the longest name LAYERS gives: "commands.common" before "commands"
        for layer, names in LAYERS.items():
            if ".".join(parts[:n]) in names:
                return layer
    raise AssertionError(f"mlakit/{name.replace('.', '/')}.py has no layer in docs/architecture.md")


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        targets = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlakit"):
                base = node.module[len("mlakit."):] if node.module != "mlakit" else ""
                for alias in node.names:  # "from mlakit.kernels import mla_decode" may name a module
                    sub = f"{base}.{alias.name}" if base else alias.name
                    targets.add(sub if (PACKAGE / f"{sub.replace('.', '/')}.py").exists() else base or "__init__")
            elif isinstance(node, ast.Import):
                targets.update(a.name[len("mlakit."):] for a in node.names if a.name.startswith("mlakit."))
        targets.discard(name)
    return graph


def test_no_import_runs_up_a_layer():
    upward = [f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
              for src, dsts in imports().items() for dst in dsts
              if src != "__init__" and layer_of(dst) > layer_of(src)]
    assert not upward, "\n".join(sorted(upward))


def test_every_module_the_layers_name_exists():
    missing = [f"layer {layer}: {name}" for layer, names in LAYERS.items() for name in names
               if not (PACKAGE / f"{name.replace('.', '/')}.py").exists() and not (PACKAGE / name).is_dir()]
    assert not missing, f"LAYERS names modules that are not in mlakit/: {missing}"


def test_only_tests_and_scripts_import_the_testing_helpers():
    users = sorted(src for src, dsts in imports().items()
                   if not src.startswith("testing") and any(d == "testing" or d.startswith("testing.") for d in dsts))
    assert not users, f"mlakit.testing is for tests and device scripts; imported by {users}"


def test_no_import_circle():
    graph = imports()
    graph.pop("__init__", None)  # the package's face re-exports; nothing imports it back
    for deps in graph.values():
        deps.discard("__init__")
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_modules_and_functions_stay_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        rel = path.relative_to(PACKAGE.parent)
        if source.count("\n") > 600:
            long.append(f"{rel}: {source.count(chr(10))} lines")
        if "kernels" in path.parts:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{rel}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(sorted(long))
