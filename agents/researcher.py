"""The researcher: searches the Vellmar Island field guide once, then answers from the passages it found."""

from multilane import Agent
from multilane.tools import search_tool

researcher = Agent(
    "researcher",
    model="assistant",
    instructions="You answer one question about Vellmar Island. Search the guide, then answer in one sentence "
                 "using only the passages.",
    tools=[search_tool(index="guide", top_k=3)],
    description="Research one question about Vellmar Island in the field guide.",
    first_step_calls=1,  # the first step must search (a 135M model would otherwise answer from nothing)
    max_tool_steps=1,  # after one search the next step must answer
    max_steps=3,
    max_answer_chars=300,
    max_tokens=384,  # room for a 300-character answer in JSON
)
