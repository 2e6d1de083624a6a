"""Built-in tools: `search` over a declared index, and a safe arithmetic `calculator` (parsed, never eval'd)."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from multilane.agents import AgentContext, Tool

__all__ = ["calculator", "safe_eval", "search_tool"]

MAX_EXPRESSION_CHARS = 200
MAX_NODES = 64
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e300

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def search_tool(index: str, *, top_k: int = 3, name: str = "search", description: str | None = None,
                max_query_chars: int = 120) -> Tool:
    """A tool that searches a declared index and returns its top passages as numbered text."""

    async def search(ctx: AgentContext, query: str) -> str:
        opened = await ctx.runtime.index(index)
        hits = (await opened.search([query], top_k))[0]
        if not hits:
            return "no passages found"
        return "\n\n".join(f"[{rank}] ({hit.chunk.source}) {hit.chunk.text.strip()}"
                           for rank, hit in enumerate(hits, 1))

    # No description on `query`: a small model copies example text from the prompt into its arguments.
    search.__annotations__ = {"ctx": AgentContext, "query": Annotated[str, Field(
        min_length=1, max_length=max_query_chars)], "return": str}
    made = Tool(search, name=name, description=description or f"Search the '{index}' documents for passages.")
    made.indexes = (index,)
    return made


def safe_eval(expression: str) -> int | float:
    """Evaluate arithmetic (numbers, + - * / // % **, unary -, parentheses) without eval; raises ValueError."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ValueError(f"expression has more than {MAX_NODES} parts")
    return _eval(tree.body)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is too large (limit {MAX_EXPONENT})")
            if abs(left) > 1 and right > 0 and right * math.log10(abs(left)) > math.log10(MAX_MAGNITUDE):
                raise ValueError("result is too large")
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("result is too large") from None
    raise ValueError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if abs(value) > MAX_MAGNITUDE:
        raise ValueError("result is too large")
    result: int | float = value
    return result


def _calculate(expression: Annotated[str, Field(max_length=MAX_EXPRESSION_CHARS)]) -> str:
    """Work out an arithmetic expression such as (3 + 4) * 2 or 2 ** 10.

    Args:
        expression: numbers with + - * / // % ** and parentheses.
    """
    value = safe_eval(expression)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


calculator = Tool(_calculate, name="calculator")
"""A tool that evaluates arithmetic safely: parsed with `ast`, never eval'd, with size limits."""
