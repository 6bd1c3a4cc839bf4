"""A byte-level tokenizer: every UTF-8 byte is a token, plus three specials.

Ids 0..255 are the bytes, ``BOS=256``, ``EOS=257``, ``PAD=258``; ``vocab_size == 259``. It needs no
training and no files, so any text (source code, prose, logs) round-trips exactly, and a dataset's
content hash stays meaningful across machines.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259


class ByteTokenizer:
    """Bytes in, bytes out. ``name`` and ``version`` enter every dataset version's content hash."""

    name = "byte"
    version = "1"
    bos_id = BOS
    eos_id = EOS
    pad_id = PAD
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, BOS)
        if eos:
            ids.append(EOS)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; specials are skipped and invalid UTF-8 becomes U+FFFD (a model may emit it)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def spec(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "vocab_size": self.vocab_size,
                "bos": BOS, "eos": EOS, "pad": PAD}
