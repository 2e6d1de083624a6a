"""Define an agent with a custom tool in a script and run it: the README's clerk, on the example corpus.

The agent is a Python object given to `Runtime.run_agent`, so it needs no agents folder and no `agents:`
section; its model and index are the ones pipelines/rag.yaml declares. Run it from the project's folder
(loading the model takes about 20 s on a CPU), with questions or without (two examples):

    python examples/clerk_agent.py "Who built the lighthouse at Cape Orrin?"
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from multilane import Agent, AgentResult, MultilaneError, Runtime, tool
from multilane.tools import calculator, search_tool

PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "rag.yaml"
QUESTIONS = ["Who built the lighthouse at Cape Orrin?", "How many days are there from day 100 to day 220 of the year?"]


@tool
def days_between(first: int, last: int = 365) -> int:
    """Count the days from one day of the year to another.

    Args:
        first: day of the year, 1-365.
        last: a later day of the year, 1-365.
    """
    return last - first


clerk = Agent(
    "clerk",
    model="assistant",  # a generate model the pipeline file declares
    instructions="You answer questions about Vellmar Island. Use lookup to find facts in the island's guide, "
                 "days_between to count days and calculator for arithmetic. Then answer in one sentence, in the "
                 "guide's own words.",  # without them, SmolLM2 in float32 (CPUs without bf16) answered with a date
    # The 135M example model picks "calculator" for every question when the search tool is called "search".
    tools=[search_tool(index="guide", top_k=3, name="lookup"), calculator, days_between],
    max_steps=4,
    first_step_calls=1,  # small models answer from nothing unless the first step must call a tool
    max_tool_steps=1,  # and go on calling tools unless the step after one must answer
    max_answer_chars=300,
    max_tokens=384,  # room for a 300-character answer in JSON
)


def show(question: str, result: AgentResult) -> None:
    """Print the answer, then every tool call with its arguments and the first line of its result."""
    print(f"question: {question}")
    print(f"answer: {result.answer}")
    for step in result.steps:
        for call in step.calls:
            lines = call.result.strip().splitlines() or [""]
            print(f"  step {step.index}: {call.tool}({call.arguments}) -> {'ok' if call.ok else 'failed'}: "
                  f"{lines[0][:120]}")
    print(f"  {len(result.steps)} steps, {result.prompt_tokens} prompt and {result.completion_tokens} generated "
          f"tokens, {result.seconds:.1f}s")


async def main(questions: list[str]) -> None:
    async with Runtime.from_file(PIPELINE) as rt:
        for question in questions:
            show(question, await rt.run_agent(clerk, question))


if __name__ == "__main__":  # vLLM starts its engine core in a child process: keep the guard
    try:
        anyio.run(main, sys.argv[1:] or QUESTIONS)
    except MultilaneError as exc:
        sys.exit(f"error: {exc}")
