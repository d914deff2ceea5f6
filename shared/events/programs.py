"""ledger.programs: every version of the earning program the ledger saved (from its program
file at start, or through the admin API), keyed "program". Produced by the ledger through its
outbox, in the transaction that saved the version; read back by the ledger when it starts, so
that a ledger rebuilt into an empty database knows every version before it replays a single
purchase, and each purchase earns under the version in force when it was recorded.

event_id derives from the version number: a version published twice is one event.
"""

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from shared.events import Envelope

PROGRAM_KEY = "program"


class ProgramVersionPublishedPayload(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int = Field(gt=0)
    # The program document as saved (services/ledger/program.py validates it).
    document: dict[str, Any]
    source: Literal["file", "admin"]
    actor: str
    # In force for every input recorded from then on, until a version with a later one.
    effective_from: AwareDatetime
    created_at: AwareDatetime


class ProgramVersionPublished(Envelope[ProgramVersionPublishedPayload]):
    type: Literal["ProgramVersionPublished"] = "ProgramVersionPublished"


PROGRAM_EVENT_TYPES = (ProgramVersionPublished,)
