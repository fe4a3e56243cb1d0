"""A corpus analysed in parallel: one ``analyze_document`` child job per document, then one
LLM call that merges their summaries (offline by default: see tasks/llm/)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from stepstream.tasks.context import TaskContext
from stepstream.tasks.demo.analyze_document import AnalyzeOutput
from stepstream.tasks.demo.options import DemoOptions
from stepstream.tasks.registry import task

STEPS = ["Analysing documents", "Merging"]


class CorpusInput(DemoOptions):
    documents: list[str] = Field(min_length=1, max_length=100, description="The documents")
    concurrency: int = Field(default=10, ge=1, le=100, description="Documents analysed at once")


class CorpusReport(BaseModel):
    documents: int
    summary: str
    keywords: list[str]
    per_document: list[str] = Field(description="Each document's own summary, in input order")


@task(
    "analyze_corpus",
    title="Analyse a corpus",
    description="Analyses every document as a child job of its own (in parallel, on any "
    "worker), then merges their summaries with one LLM call.",
    steps=STEPS,
    input=CorpusInput,
    output=CorpusReport,
    max_attempts=2,
    sample_input={
        "documents": [
            "Revenue grew twelve percent in the third quarter. Churn fell to a two-year low.",
            "The infrastructure migration finished early. Hosting costs dropped by a fifth.",
            "Hiring slowed as planned. The team focused on retention and internal tooling.",
            "Support tickets per customer dropped. Onboarding was redesigned in the spring.",
            "Next quarter the enterprise plan expands to Europe. A Berlin office opens in May.",
        ],
        "pace": 0.3,
    },
)
async def analyze_corpus(ctx: TaskContext, data: CorpusInput) -> CorpusReport:
    """Fan out one child per document (this job waits for them holding no worker, its
    progress rising as they end), then merge."""
    analyses: list[AnalyzeOutput] = await ctx.map(
        "analyze_document",
        [
            {"title": f"Document {i}", "text": text, "pace": data.pace}
            for i, text in enumerate(data.documents, start=1)
        ],
        step=STEPS[0],
        concurrency=data.concurrency,
    )
    summaries = [a.summary for a in analyses]
    merged = await ctx.llm(
        [
            {
                "role": "user",
                "content": "Merge these document summaries into one paragraph. "
                + " ".join(summaries),
            }
        ],
        step=STEPS[1],
    )
    counts: dict[str, int] = {}
    for analysis in analyses:
        for keyword in analysis.keywords[:5]:
            counts[keyword] = counts.get(keyword, 0) + 1
    keywords = sorted(counts, key=lambda k: (-counts[k], k))[:10]
    return CorpusReport(
        documents=len(analyses), summary=merged, keywords=keywords, per_document=summaries
    )
