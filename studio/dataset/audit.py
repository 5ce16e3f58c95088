"""The dataset audit: what to fix before training, found from the concepts (studio.dataset.concepts),
the captions and the pixels. Each finding names one image (its `rel` path, which opens it in the
Caption tab's editor) or one concept, and says why.

- `mislabel`: an image of a concept whose caption lacks most of the concept's core tags (a likely
  mislabel, or a different outfit the person may want as a concept of its own);
- `foreign_tag`: an image of one concept whose caption holds another concept's trigger or
  character tag (that character's look would be learned under this one's name);
- `missing_trigger`: an image of a concept (its repeat folder, or the whole dataset) whose caption
  lacks every trigger of that concept;
- `few_images`: a concept with fewer than FEW_IMAGES images;
- `duplicate`: two images within a few bits of each other's perceptual hash, in different concepts
  (or both in none), which teaches both concepts one picture;
- `unassigned`: images no concept claims (only reported when there are several concepts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from studio.captioning.tag_rules import tag_key
from studio.dataset.concepts import ConceptReport, dataset_concepts, entries_of

FEW_IMAGES = 10  # a concept with fewer images tends not to learn (kohya users aim for 15-50)
MISLABEL_MISSING = 0.5  # an image lacking at least this share of its concept's core tags ...
MIN_CORE_FOR_MISLABEL = 3  # ... when the concept has at least this many core tags


@dataclass(frozen=True)
class Finding:
    kind: str  # mislabel, foreign_tag, missing_trigger, few_images, duplicate, unassigned
    concept: str
    rel: str  # the image it is about ("" for a finding about a whole concept)
    message: str
    other: str = ""  # the other image of a duplicate pair

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Audit:
    concepts: ConceptReport
    findings: tuple[Finding, ...]
    problems: tuple[str, ...] = ()  # images that could not be hashed for the duplicate check

    def by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for finding in self.findings:
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
        return counts

    def summary(self) -> str:
        """'3 concepts; 5 findings: 2 mislabel, 1 duplicate, ...' (or 'no findings')."""
        kinds = self.by_kind()
        found = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(kinds.items()))
        return f"{len(self.concepts.concepts)} concept(s); " + (
            f"{len(self.findings)} finding(s): {found}" if self.findings else "no findings")

    def to_json(self) -> dict:
        return {"summary": self.summary(), "concepts": self.concepts.to_json(),
                "findings": [f.to_json() for f in self.findings], "problems": list(self.problems)}

    def table(self) -> list[list[str]]:
        return [[f.kind, f.concept, f.rel, f.message] for f in self.findings]


def caption_findings(report: ConceptReport, tags_of: dict[str, tuple[str, ...]]) -> list[Finding]:
    """Every finding that needs only the captions (all but duplicates)."""
    findings: list[Finding] = []
    keys_of = {rel: {tag_key(t) for t in tags} for rel, tags in tags_of.items()}
    triggers_of = {c.name: {tag_key(t) for t in c.triggers} for c in report.concepts}
    for concept in report.concepts:
        if len(concept.images) < FEW_IMAGES:
            findings.append(Finding("few_images", concept.name, "",
                                    f"{concept.name}: {len(concept.images)} image(s); concepts with fewer than "
                                    f"{FEW_IMAGES} tend not to learn their look"))
        core = {tag_key(t): t for t in concept.core_tags}
        others = {key: other for other, keys in triggers_of.items() if other != concept.name for key in keys
                  if key not in triggers_of[concept.name]}
        bound_to_triggers = concept.spec.folder or concept.spec.source == "dataset"
        for rel in concept.images:
            keys = keys_of.get(rel, set())
            if bound_to_triggers and triggers_of[concept.name] and not keys & triggers_of[concept.name]:
                findings.append(Finding("missing_trigger", concept.name, rel,
                                        f"the caption lacks {' / '.join(concept.triggers)}"))
            if len(core) >= MIN_CORE_FOR_MISLABEL:
                missing = [tag for key, tag in core.items() if key not in keys]
                if len(missing) >= MISLABEL_MISSING * len(core):
                    findings.append(Finding("mislabel", concept.name, rel,
                                            f"lacks {len(missing)} of {concept.name}'s {len(core)} core tags "
                                            f"({', '.join(missing[:6])}): another character, a different outfit, "
                                            "or a caption to fix"))
            foreign = sorted({others[key] for key in keys if key in others})
            if foreign and bound_to_triggers:
                findings.append(Finding("foreign_tag", concept.name, rel,
                                        f"tagged with {', '.join(foreign)}'s trigger in {concept.name}'s images: "
                                        "that look is learned under both names"))
            elif foreign:
                both = [concept.name, *foreign]
                findings.append(Finding("foreign_tag", concept.name, rel,
                                        f"one caption names {' and '.join(both)}: fine for a picture of both, "
                                        "else a tag to fix"))
    if len(report.concepts) > 1:
        for rel in report.unassigned:
            findings.append(Finding("unassigned", "", rel, "no concept's trigger or folder: trained as a plain image"))
    return _unique_pairs(findings)


def _unique_pairs(findings: list[Finding]) -> list[Finding]:
    """A caption naming two flat concepts is reported once, not once per concept."""
    seen, out = set(), []
    for finding in findings:
        key = (finding.kind, finding.rel) if finding.kind == "foreign_tag" and " and " in finding.message else None
        if key is None or key not in seen:
            out.append(finding)
        if key:
            seen.add(key)
    return out


def duplicate_findings(report: ConceptReport, groups: Iterable[list[str]]) -> list[Finding]:
    """Near-duplicate groups (rel paths) whose images sit in different concepts (or in none)."""
    concepts_of: dict[str, set[str]] = {}
    for concept in report.concepts:
        for rel in concept.images:
            concepts_of.setdefault(rel, set()).add(concept.name)
    findings = []
    for group in groups:
        group = sorted(group)
        first = group[0]
        for other in group[1:]:
            a, b = concepts_of.get(first, set()), concepts_of.get(other, set())
            if a != b or not a:
                names = " / ".join(sorted(a) or ["no concept"]) + " and " + " / ".join(sorted(b) or ["no concept"])
                findings.append(Finding("duplicate", ", ".join(sorted(a | b)), other,
                                        f"near-duplicate of {first} ({names})", other=first))
    return findings


def audit_dataset(dataset, *, character_tags: Iterable[str] = (), triggers: Iterable[str] = (),
                  duplicates: bool = True, on_progress: Callable[[int, int], None] | None = None) -> Audit:
    """The audit of an open `Dataset` (`duplicates`: also hash every image, which reads them all)."""
    report = dataset_concepts(dataset, character_tags=character_tags, triggers=triggers)
    tags_of = {entry.rel: entry.tags for entry in entries_of(dataset)}
    findings = caption_findings(report, tags_of)
    problems: tuple[str, ...] = ()
    if duplicates:
        groups, hash_problems = dataset.near_duplicates(on_progress=on_progress)
        findings += duplicate_findings(report, [[item.rel for item in group] for group in groups])
        problems = tuple(f"{p.path.name}: {p.reason}" for p in hash_problems)
    return Audit(report, tuple(findings), problems)
