"""The label set: the 14 NIH ChestX-ray14 findings plus No Finding, in model output order."""

FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NO_FINDING = "No Finding"
LABELS = FINDINGS + (NO_FINDING,)


def parse_finding_labels(text: str) -> list[int]:
    """NIH `Finding Labels` ("Effusion|Mass" or "No Finding") -> multi-hot over LABELS."""
    names = {name.strip() for name in text.split("|") if name.strip()}
    unknown = names - set(LABELS)
    if unknown:
        raise ValueError(f"unknown finding label(s) {sorted(unknown)}; expected names from {LABELS}")
    return [int(label in names) for label in LABELS]
