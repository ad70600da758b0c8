"""One runner per way of answering; each owns its loop from the first token to the last.

* ``TeacherRunner`` (``teacher`` mode): the teacher writes the whole answer;
* ``GuidedRunner`` (``gkt`` mode under ``fixed``, ``adaptive`` or ``reguide``, and ``student`` mode): the
  teacher's guidance, if any, starts the answer, the student finishes it, in rounds when re-guidance asks the
  teacher again;
* ``VerifyRunner`` (``gkt`` mode under ``verify``): the student drafts, the teacher checks each draft;
* ``Echoed`` (``max_tokens`` 0 with ``echo``): the prompt alone, nothing generated.

A runner yields the answer's ``Delta``s and leaves its ``finish`` reason; ``edge_agent/pipeline.py`` picks it
and closes the books. The decisions (when to stop, when to call again) are pure code in
``edge_agent/policies.py``; the runners do the I/O around them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol

from edge_agent.answer import Delta

Finish = Literal["stop", "length"]


class Runner(Protocol):
    """Produces one answer: ``run`` yields its deltas, then ``finish`` says how it ended."""

    finish: Finish | None

    def run(self) -> AsyncIterator[Delta]: ...


class Echoed:
    """``max_tokens`` 0 (with echo): the prompt alone is the answer; nothing is generated."""

    finish: Finish | None = "length"

    async def run(self) -> AsyncIterator[Delta]:
        return
        yield
