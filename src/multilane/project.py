"""A project: its pipeline file with the agents it uses, loaded from agents/ and checked against the file."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import sys
import traceback
import types
from pathlib import Path

from multilane.agents import Agent
from multilane.errors import SpecError
from multilane.spec import (
    AgentStage,
    Problem,
    Spec,
    check_spec,
    combine_problems,
    read_spec,
    read_spec_file,
)

__all__ = ["agents_folder", "check_agent", "check_agent_stages", "load_agents", "load_spec", "parse_spec"]


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and validate a pipeline file, with the agents it uses; raises SpecError naming file, line and field."""
    file_path = Path(path)
    text = read_spec_file(path)
    return _complete(read_spec(text, os.fspath(path), file_path.absolute().parent, file_path))


def parse_spec(text: str, file: str = "<string>", base_dir: Path | None = None) -> Spec:
    """Validate pipeline YAML given as text; `file` names it in errors and `base_dir` anchors relative paths."""
    return _complete(read_spec(text, file, Path(base_dir) if base_dir is not None else Path.cwd()))


def _complete(spec: Spec) -> Spec:
    """Load the file's agents when it declares or uses any, then check every cross-reference at once."""
    if spec.file.agents is not None or any(
            isinstance(stage, AgentStage) for p in spec.pipelines.values() for stage in p.stages.values()):
        spec = dataclasses.replace(spec, agents=load_agents(spec))  # imports the project's agent files
    problems = [*check_spec(spec), *check_agent_stages(spec)]
    if problems:
        raise combine_problems(problems)
    return spec


# ---------------------------------------------------------------------------------------------
# Loading agents from the project's agents/ folder and allow-listed modules


def agents_folder(spec: Spec) -> Path | None:
    """The folder of agent files: `agents.path` when set, else `agents/` beside the file, else `../agents`."""
    declared = spec.file.agents
    if declared is not None and declared.path is not None:
        return spec.resolve_path(declared.path)
    for candidate in (spec.base_dir / "agents", spec.base_dir.parent / "agents"):
        if candidate.is_dir():
            return candidate
    return None


def _import_error(exc: BaseException, file: Path) -> SpecError:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == file]
    line = frames[-1].lineno if frames else getattr(exc, "lineno", None)
    return SpecError(f"cannot load agents: {type(exc).__name__}: {exc}", file=str(file), line=line)


def _collect(module: types.ModuleType, found: dict[str, Agent], origin: str) -> None:
    for value in vars(module).values():
        if not isinstance(value, Agent):
            continue
        other = found.get(value.name)
        if other is not None and other is not value:
            raise SpecError(f"agent '{value.name}' is defined twice: {other.defined_at} and {value.defined_at}",
                            file=origin)
        found[value.name] = value


def load_agents(spec: Spec) -> dict[str, Agent]:
    """Import the spec's agent files (and only its allow-listed modules) and return their agents by name."""
    found: dict[str, Agent] = {}
    declared = spec.file.agents
    folder = agents_folder(spec)
    if folder is not None and not folder.is_dir():
        raise spec.error(f"agents folder not found: {folder}", ("agents", "path"))
    if folder is not None:
        folder = folder.resolve()
        package = "multilane_agents_" + hashlib.sha256(str(folder).encode()).hexdigest()[:10]
        if package not in sys.modules:  # the folder's files are modules of one package: `from .x import y` works
            module = types.ModuleType(package, f"Agents under {folder}")
            module.__path__ = [str(folder)]
            sys.modules[package] = module
        for file in sorted(folder.glob("*.py")):
            if file.name.startswith("_"):
                continue
            try:
                loaded = importlib.import_module(f"{package}.{file.stem}")
            except SpecError:
                raise
            except Exception as exc:  # the user's file failed: say where
                raise _import_error(exc, file) from None
            _collect(loaded, found, str(file))
    for i, name in enumerate(declared.allow_modules if declared is not None else []):
        try:
            loaded = importlib.import_module(name)
        except Exception as exc:
            raise spec.error(f"cannot import allowed module '{name}': {type(exc).__name__}: {exc}",
                             ("agents", "allow_modules", i)) from None
        _collect(loaded, found, spec.name)
    return found


# ---------------------------------------------------------------------------------------------
# Checking agents against the file


def check_agent_stages(spec: Spec) -> list[Problem]:
    """Every `agent` stage names a loaded agent whose models and indexes the file declares."""
    problems: list[Problem] = []
    for pipeline_name, pipeline in spec.pipelines.items():
        for stage_name, stage in pipeline.stages.items():
            if not isinstance(stage, AgentStage):
                continue
            path = ("pipelines", pipeline_name, "stages", stage_name, "agent")
            agent = spec.agents.get(stage.agent)
            if agent is None:
                declared = ", ".join(sorted(spec.agents)) or "none"
                messages = [f"unknown agent '{stage.agent}' (agents: {declared}; {_agents_hint(spec)})"]
            else:
                messages = check_agent(agent, spec)
            problems.extend(Problem(message, spec.name, spec.line_of(path), path) for message in messages)
    return problems


def check_agent(agent: Agent, spec: Spec) -> list[str]:
    """What is wrong between an agent (and its sub-agents) and the pipeline file: models and indexes."""
    problems: list[str] = []
    seen: set[int] = set()

    def visit(current: Agent) -> None:
        if id(current) in seen:
            return
        seen.add(id(current))
        where = f"agent '{current.name}' ({_short(current.defined_at)})"
        model = spec.models.get(current.model)
        if model is None:
            problems.append(f"{where} uses unknown model '{current.model}' (declared: {', '.join(spec.models)})")
        elif model.kind != "generate":
            problems.append(f"{where} uses model '{current.model}', which is an {model.kind} model; "
                            "an agent needs a generate model")
        for t in current.tools:
            for index in t.indexes:
                if index not in spec.indexes:
                    declared = ", ".join(spec.indexes) or "none"
                    problems.append(f"{where} tool '{t.name}' searches unknown index '{index}' (declared: {declared})")
            if t.agent is not None:
                visit(t.agent)

    visit(agent)
    return problems


def _agents_hint(spec: Spec) -> str:
    folder = agents_folder(spec)
    modules = spec.file.agents.allow_modules if spec.file.agents is not None else []
    where = f"Python files under {folder.resolve()}" if folder is not None else "no agents/ folder found"
    return where + (f" and modules {', '.join(modules)}" if modules else "")


def _short(origin: str) -> str:
    path, _, line = origin.rpartition(":")
    try:
        shown = str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        shown = path
    return f"{shown}:{line}"
