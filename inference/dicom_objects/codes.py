"""Every coded concept the result objects use, in one place: standard codes first, our local ones after.

Body parts are SNOMED CT anatomic locations (the bundle's part names map through FINDING_SITES; a part not
in it gets BONE, so an unknown name is never refused and never guessed). Where no standard concept says what
we mean (an operating point's flag, an abstention, an untrained bundle) the code is our own, under the
private coding scheme 99BFD (PS3.3 8.2: designators starting with "99" are private), and the SR carries its
Coding Scheme Identification.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def _dcm(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="DCM", meaning=meaning)


LOCAL_SCHEME = "99BFD"


def _local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning)


# --- anatomy: the bundle's body part names -> SNOMED CT -------------------------------------------------------
BONE = _sct("272673000", "Bone")  # any other part name: the fracture is of a bone, where is unknown here
FINDING_SITES: dict[str, CodedConcept] = {
    "elbow": _sct("16953009", "Elbow joint"),
    "hand": _sct("85562004", "Hand"),
    "shoulder": _sct("16982005", "Shoulder"),
    "finger": _sct("7569003", "Finger"),
    "forearm": _sct("14975008", "Forearm"),
    "humerus": _sct("85050009", "Humerus"),
    "wrist": _sct("74670003", "Wrist joint"),
    "hip": _sct("29836001", "Hip"),
    "leg": _sct("61685007", "Lower limb"),
    "knee": _sct("72696002", "Knee"),
    "foot": _sct("56459004", "Foot"),
    "pelvis": _sct("816092008", "Pelvis"),
}


def finding_site(part: str) -> CodedConcept:
    """The SNOMED CT anatomic location of a bundle's body part name (BONE for names not in the table)."""
    return FINDING_SITES.get(part.strip().lower(), BONE)


# --- the finding and its values ---------------------------------------------------------------------------------
FRACTURE = _sct("125605004", "Fracture of bone")
PRESENT = _sct("52101004", "Present")
ABSENT = _sct("272519000", "Absent")
INDETERMINATE = _sct("82334004", "Indeterminate")  # an abstention: never ABSENT
PLAIN_RADIOGRAPHY = _sct("168537006", "Plain radiography")  # the procedure reported
PROBABILITY = _dcm("122157", "Probability")  # P(fractured) from the body part's specialist
PROBABILITY_UNIT = CodedConcept(value="{probability}", scheme_designator="UCUM", meaning="probability")
COMMENT = _dcm("121106", "Comment")  # the research-use disclaimer

# --- ours: what no standard concept says -----------------------------------------------------------------------
SUSPICIOUS = _local("SUSPICIOUS", "Fracture at the high-sensitivity operating point")
DEFINITE = _local("DEFINITE", "Fracture at the high-specificity operating point")
ABSTENTION = _local("ABSTENTION", "Abstention reason")  # the model is out of its depth: why
UNTRAINED = _local("UNTRAINED", "Untrained model warning")
STUDY_RULE = _local("STUDYRULE", "Study rule")  # how the study's answer comes from its images'


def local_scheme_identification() -> Dataset:
    """An item of Coding Scheme Identification Sequence (0008,0110) naming the 99BFD scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "Bone-Fracture-Detection local codes"
    item.CodingSchemeResponsibleOrganization = "Bone-Fracture-Detection (research use only)"
    return item
