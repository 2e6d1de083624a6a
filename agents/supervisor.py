"""The supervisor: splits a question into three research tasks, runs three researchers at once, and combines."""

from multilane import Agent

from .researcher import researcher  # files under agents/ are one package: import siblings relatively

supervisor = Agent(
    "supervisor",
    model="assistant",
    instructions="You answer questions about Vellmar Island with the help of researchers. Give three researchers "
                 "one short, different question each, all at once, then combine what they found into one answer.",
    tools=[researcher.as_tool(max_task_chars=120)],  # an Agent passed in tools becomes researcher.as_tool()
    parallel_calls=3,  # one step may call up to three researchers; they run concurrently
    first_step_calls=3,  # the first step fans out to exactly three
    max_tool_steps=1,  # then it answers
    max_steps=3,
    max_answer_chars=500,
    max_tokens=512,  # room for three tasks of up to 120 characters, even at a few characters per token
)
