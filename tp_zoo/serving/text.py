"""A request's text as its new ids come: decoded piece by piece as
`generate(..., stream=True)` shows it (`IncrementalText`), and cut before
the first of its stop strings."""

from tp_zoo.models.generation.streaming import IncrementalText

# The ids decoded before new ones, so that their text shows as it would after
# all the ids so far (a leading space, a merge); and how many ids are decoded
# before decoding starts again after the last CONTEXT_IDS, so that a step
# costs the same however long the text has grown.
CONTEXT_IDS = 8
REDECODE_IDS = 64


class RequestText:
    """The text of a request's new ids, as pieces (`add`, then `finish` once
    the ids end). A completion's text follows its prompt's ids (`context`),
    a reply's starts on its own. The text ends before the first of the
    `stop` strings (`stopped` then says so); while its end could begin one,
    that end is held back."""

    def __init__(self, decode, stop=(), context=()):
        self._decode = decode
        self._stop = tuple(stop)
        self._held = ""
        self.stopped = False
        context = [int(i) for i in context][-CONTEXT_IDS:]
        if decode(context).endswith("\ufffd"):  # a prompt of ids ending inside a character: its text never settles
            context = []
        self._text = IncrementalText(decode, context)

    def add(self, ids):
        """The text that `ids` add and that can be shown now."""
        if self.stopped:
            return ""
        piece = self._text.add(ids)
        if piece and len(self._text.ids) > REDECODE_IDS:  # a piece means nothing is held back in the ids
            self._text = IncrementalText(self._decode, self._text.ids[-CONTEXT_IDS:])
        return self._cut(piece)

    def finish(self):
        """The rest of the text once the ids end: what was held back."""
        if self.stopped:
            return ""
        text = self._cut(self._text.add((), final=True))
        if not self.stopped:
            text, self._held = text + self._held, ""
        return text

    def _cut(self, piece):
        text = self._held + piece
        starts = [start for start in (text.find(stop) for stop in self._stop) if start >= 0]
        if starts:
            self.stopped, self._held = True, ""
            return text[: min(starts)]
        held = max((n for stop in self._stop for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self._held = text[len(text) - held:]
        return text[: len(text) - held]
