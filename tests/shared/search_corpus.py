"""The documents and questions both vector-search examples' tests (Qdrant and pgvector) index and
ask, with the answers their demo must rank first, and how to read the scripts' printed results."""

from __future__ import annotations

CORPUS = [
    "A cheetah can sprint at over 100 kilometres per hour, faster than any other land animal.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
    "Honey bees pollinate crops and make honey from the nectar of flowers.",
    "The French Revolution began in 1789 with the storming of the Bastille.",
    "To reset your password, click 'Forgot password' on the login page and follow the emailed link.",
    "Drinking enough water keeps the body hydrated and helps regulate its temperature.",
    "Solar panels convert sunlight directly into electricity using photovoltaic cells.",
    "The Beatles were a rock band formed in Liverpool in 1960.",
    "Espresso is brewed by forcing hot water through finely ground coffee under pressure.",
    "Tax returns in the United States are usually due on April 15.",
]
# Paraphrases that share few words with their answer: the ranking has to come from meaning.
QUERIES = {
    "Which animal runs the fastest?": 0,
    "What is the tallest peak in the world?": 1,
    "I forgot my login, how do I get back into my account?": 4,
    "How do rooftop panels generate power from the sun?": 6,
    "How is a strong Italian coffee made?": 8,
}
# The demo's queries, in order, and the index in DEMO_CORPUS of the answer each must rank first.
DEMO_ANSWERS = [1, 6, 0, 5]


def first_results(stdout: str) -> dict[str, str]:
    """{query: the text ranked first} from the script's printed results."""
    lines = stdout.splitlines()
    return {
        line.removeprefix("Query: "): lines[i + 1].split("  ", 2)[2]
        for i, line in enumerate(lines)
        if line.startswith("Query: ")
    }
