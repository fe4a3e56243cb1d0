"""Document analysis in seven steps, offline: a hashing vectoriser instead of a model download."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections import Counter

from pydantic import BaseModel, Field, field_validator

from stepstream.tasks.context import TaskContext
from stepstream.tasks.demo.options import DemoOptions, checkpoint, paced_progress
from stepstream.tasks.registry import task

STEPS = [
    "Parsing document",
    "Chunking document",
    "Embedding chunks",
    "Ranking chunks",
    "Extracting keywords",
    "Writing summary",
    "Validating output",
]
DIMENSIONS = 256
STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just me more most my myself no nor not now of off on once only or
    other our ours out over own same she should so some such than that the their theirs
    them themselves then there these they this those through to too under until up very was
    we were what when where which while who whom why will with would you your yours also
    may might must shall one two
    """.split()  # noqa: SIM905 - a word list reads better as text
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")


class AnalyzeInput(DemoOptions):
    text: str = Field(min_length=1, max_length=200_000, description="The document body")
    title: str = Field(default="Untitled document", max_length=200)
    chunk_words: int = Field(default=60, ge=10, le=1000, description="Words per chunk")
    summary_sentences: int = Field(default=3, ge=1, le=20)

    @field_validator("text")
    @classmethod
    def has_words(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text must contain more than white space")
        return value


class DocumentStats(BaseModel):
    characters: int
    words: int
    sentences: int
    chunks: int


class RankedChunk(BaseModel):
    index: int
    score: float
    preview: str


class Parsed(BaseModel):
    """What parsing stores for the later steps."""

    sentences: list[str]
    words: int
    characters: int


class AnalyzeOutput(BaseModel):
    title: str
    summary: str = Field(min_length=1)
    keywords: list[str]
    top_chunks: list[RankedChunk]
    stats: DocumentStats


def tokens(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text) if w.lower() not in STOPWORDS]


def embed(text: str) -> list[float]:
    """Feature hashing: each token adds ±1 to a bucket chosen by its hash; L2-normalised."""
    vector = [0.0] * DIMENSIONS
    for token in tokens(text):
        digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest[:4], "little") % DIMENSIONS
        vector[bucket] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def every(total: int) -> int:
    """Report progress about twenty times a step, whatever the size."""
    return max(1, math.ceil(total / 20))


@task(
    "analyze_document",
    title="Analyse a document",
    description="Parses, chunks, embeds and ranks a document, then extracts keywords and an "
    "extractive summary.",
    steps=STEPS,
    input=AnalyzeInput,
    output=AnalyzeOutput,
    max_attempts=3,
    timeout=600,
    sample_input={
        "title": "Quarterly report",
        "text": (
            "Revenue grew twelve percent in the third quarter, led by the enterprise plan. "
            "Churn fell to its lowest level in two years after the onboarding redesign. "
            "Support tickets per customer dropped while the customer base grew. "
            "The infrastructure migration finished two weeks early and under budget. "
            "Hiring slowed as planned; the team focused on retention and tooling. "
            "Next quarter the company will expand the enterprise plan to Europe."
        ),
        "pace": 0.5,
    },
)
async def analyze_document(ctx: TaskContext, data: AnalyzeInput) -> AnalyzeOutput:
    """Analyse a document: summary, keywords and the most central passages.

    Every step is checkpointed: what it returns is stored, and a job that runs again (a retry,
    a killed worker) picks up after the last completed step. Vectors are not stored: they are
    cheap to compute again from the chunks, in the steps that need them.
    """

    async def parse() -> Parsed:
        await checkpoint(ctx, data, STEPS[0])
        body = " ".join(data.text.split())
        parsed = Parsed(
            sentences=[s for s in _SENTENCE.split(body) if s],
            words=len(body.split()),
            characters=len(body),
        )
        await ctx.log(f"Parsed {len(parsed.sentences)} sentences and {parsed.words} words")
        return parsed

    parsed = await ctx.run_step(
        STEPS[0], parse, output=lambda p: {"sentences": len(p.sentences), "words": p.words}
    )

    async def chunk() -> list[str]:
        await checkpoint(ctx, data, STEPS[1])
        chunks: list[list[str]] = [[]]
        for sentence in parsed.sentences:
            if chunks[-1] and sum(len(s.split()) for s in chunks[-1]) >= data.chunk_words:
                chunks.append([])
            chunks[-1].append(sentence)
        return [" ".join(c) for c in chunks]

    texts = await ctx.run_step(STEPS[1], chunk, output=lambda t: {"chunks": len(t)})

    async def embed_chunks() -> list[float]:
        await checkpoint(ctx, data, STEPS[2])
        vectors: list[list[float]] = []
        for i, text in enumerate(texts, start=1):
            vectors.append(embed(text))
            if i % every(len(texts)) == 0 or i == len(texts):
                await paced_progress(ctx, data, i, len(texts), f"Embedded {i} of {len(texts)}")
        return [sum(column) / len(vectors) for column in zip(*vectors, strict=True)]

    centroid = await ctx.run_step(
        STEPS[2], embed_chunks, output=lambda c: {"chunks": len(texts), "dimensions": len(c)}
    )

    async def rank() -> list[RankedChunk]:
        await checkpoint(ctx, data, STEPS[3])
        scores = [cosine(embed(text), centroid) for text in texts]
        order = sorted(range(len(texts)), key=lambda i: -scores[i])
        return [
            RankedChunk(index=i + 1, score=round(scores[i], 4), preview=texts[i][:160])
            for i in order[:3]
        ]

    top = await ctx.run_step(STEPS[3], rank, output=lambda t: {"top_chunk": t[0].index})

    async def extract_keywords() -> list[str]:
        await checkpoint(ctx, data, STEPS[4])
        document_frequency: Counter[str] = Counter()
        term_frequency: Counter[str] = Counter()
        for text in texts:
            chunk_tokens = tokens(text)
            term_frequency.update(chunk_tokens)
            document_frequency.update(set(chunk_tokens))
        weight = {
            term: count * (1 + math.log((1 + len(texts)) / (1 + document_frequency[term])))
            for term, count in term_frequency.items()
        }
        keywords = sorted(weight, key=lambda t: (-weight[t], t))[:10]
        await ctx.log(f"Top keywords: {', '.join(keywords[:3]) or 'none'}")
        return keywords

    keywords = await ctx.run_step(STEPS[4], extract_keywords, output=lambda k: {"keywords": k[:5]})

    async def summarise() -> str:
        await checkpoint(ctx, data, STEPS[5])
        sentences = parsed.sentences
        sentence_scores = [cosine(embed(s), centroid) for s in sentences]
        best = sorted(range(len(sentences)), key=lambda i: -sentence_scores[i])
        chosen = sorted(best[: data.summary_sentences])
        summary = " ".join(sentences[i] for i in chosen)
        # Streamed as it is composed, a word at a time (a tenth of the pace apart): the
        # dashboard shows it growing, as it would show a model's reply.
        async with ctx.output() as out:
            for word in re.findall(r"\S+\s*", summary):
                if data.pace:
                    await asyncio.sleep(data.pace / 10)
                await out.write(word)
        return summary

    summary = await ctx.run_step(STEPS[5], summarise, output=lambda s: {"words": len(s.split())})

    async def validate() -> AnalyzeOutput:
        await checkpoint(ctx, data, STEPS[6])
        return AnalyzeOutput.model_validate(
            {
                "title": data.title,
                "summary": summary,
                "keywords": keywords,
                "top_chunks": top,
                "stats": {
                    "characters": parsed.characters,
                    "words": parsed.words,
                    "sentences": len(parsed.sentences),
                    "chunks": len(texts),
                },
            }
        )

    return await ctx.run_step(STEPS[6], validate, output=lambda _: {"valid": True})
