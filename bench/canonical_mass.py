"""Measurement: how much of a text's probability its canonical tokenization carries.

A model gives a text y the probability sum_{s: decode(s) = y} p(s | x) over every token sequence s that spells it;
`prefkd.logprobs.text_logprobs` (and so DPKD across tokenizers) scores only the canonical s, a lower bound. Here
every tokenization of short test answers is enumerated (byte-level BPE: every split of the text's bytes into
vocabulary tokens, end token appended) and scored with the benchmark teacher (the demo's mini GPT-2, trained); the
figure is the mean share of the text's mass on its canonical tokenization, and the mean gap
log sum_s p(s) - log p(canonical) in nats. Texts with more than `CAP` tokenizations are left out (counted).
"""

from __future__ import annotations

import math

import torch

from bench import common, fixtures
from prefkd.data.byte_spans import byte_level_decoder
from prefkd.data.chat import Renderer
from prefkd.data.collate import Example, collate
from prefkd.data.loaders import load_instructions
from prefkd.logprobs import sequence_logps, text_ids
from prefkd.models import load_model, load_tokenizer

CAP = 4000
MAX_BYTES = 24


def tokenizations(text: str, vocab: dict[str, int], cap: int) -> list[list[int]] | None:
    """Every split of `text` (a byte-level BPE tokenizer's alphabet) into vocabulary tokens; None past `cap`."""
    encoder = {b: c for c, b in byte_level_decoder().items()}
    chars = "".join(encoder[b] for b in text.encode("utf-8"))
    longest = max(len(t) for t in vocab)
    out: list[list[int]] = []

    def walk(at: int, path: list[int]) -> bool:
        if at == len(chars):
            out.append(path)
            return len(out) <= cap
        for end in range(at + 1, min(len(chars), at + longest) + 1):
            token = vocab.get(chars[at:end])
            if token is not None and not walk(end, [*path, token]):
                return False
        return True

    return out if walk(0, []) else None


@torch.no_grad()
def run(quick: bool) -> dict:
    teacher_path, _ = fixtures.models()
    model, tok = load_model(str(teacher_path)).eval(), load_tokenizer(str(teacher_path))
    renderer = Renderer(tok)
    vocab = {t: i for t, i in tok.get_vocab().items() if i not in tok.all_special_ids}
    records = [r for r in load_instructions(fixtures.data_dir() / "test.jsonl")
               if len(r.references[0].encode("utf-8")) <= MAX_BYTES][: 12 if quick else 40]
    shares, gaps, counts, skipped = [], [], [], 0
    for rec in records:
        text = rec.references[0]
        splits = tokenizations(text, vocab, CAP)
        if splits is None:
            skipped += 1
            continue
        prompt = renderer.prompt_ids([rec])[0]
        logps = []
        for start in range(0, len(splits), 256):
            batch = collate([Example(prompt, s + renderer.end_ids) for s in splits[start: start + 256]],
                            tok.pad_token_id)
            logps.append(sequence_logps(model, batch)[0].double())
        logp = torch.cat(logps)
        canonical = splits.index(text_ids(tok, text))
        total = torch.logsumexp(logp, 0).item()
        shares.append(math.exp(logp[canonical].item() - total))
        gaps.append(total - logp[canonical].item())
        counts.append(len(splits))
    figures = {"canonical_tokenization_mass_share": round(sum(shares) / len(shares), 4)}
    details = {"texts": len(shares), "skipped_over_cap": skipped, "min_share": round(min(shares), 4),
               "mean_gap_nats": round(sum(gaps) / len(gaps), 4), "max_gap_nats": round(max(gaps), 4),
               "mean_tokenizations": round(sum(counts) / len(counts), 1)}
    settings = {"model": "bench teacher (gpt2 mini, 300 SFT steps, byte-level BPE 2048)", "texts": "suite test "
                f"references of at most {MAX_BYTES} bytes", "cap": CAP}
    common.save("canonical_mass", figures, settings, details)
    common.table("Canonical tokenization's share of a text's probability (all tokenizations enumerated)", [
        ("mean share on the canonical tokenization", f"{figures['canonical_tokenization_mass_share']}", "report"),
        ("min share; mean, max gap (nats)", f"{details['min_share']}; {details['mean_gap_nats']}, "
                                            f"{details['max_gap_nats']}", ""),
        ("texts (left out over the cap); mean tokenizations", f"{details['texts']} ({skipped}); "
                                                              f"{details['mean_tokenizations']}", "")])
    return figures
