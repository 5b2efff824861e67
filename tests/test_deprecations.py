"""prefkd's own calls into transformers use no deprecated API.

pyproject's `filterwarnings` turns deprecation warnings attributed to prefkd into errors, but transformers reports
some deprecations where that filter cannot see them: `deprecate_kwarg` warns with `stacklevel=2`, which names torch's
`Module.__call__` rather than the code that passed the argument, and the renamed output fields (`out.past_key_values`)
only log through `logger.warning_once`, which is no Python warning at all and is printed once per process. This test
runs a short sft + distillation (teacher sampling, packed training forwards) through the CLI and looks at both."""

import logging
import warnings

import transformers
from typer.testing import CliRunner

from prefkd.cli import app

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def test_a_short_run_uses_no_deprecated_transformers_api(tmp_path, tokenizer, caplog):
    from support import tiny_files

    files = tiny_files(tmp_path, tokenizer)
    # warning_once remembers what it printed: a message an earlier test already triggered would not come again.
    transformers.utils.logging.warning_once.cache_clear()
    lib_logger = logging.getLogger("transformers")  # it does not propagate to the root logger caplog listens on
    lib_logger.addHandler(caplog.handler)
    runner = CliRunner()
    common = ["train.batch_size=4", "train.log_every=1", "train.steps=2"]
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            for name, size in (("teacher", "micro"), ("student", "nano")):
                res = runner.invoke(app, ["sft", f"out={tmp_path / name}", f"tokenizer={files['tokenizer']}",
                                          f"model.size={size}", f"data.train={files['train']}", *common])
                assert res.exit_code == 0, res.output
            res = runner.invoke(app, ["distill", "--method", "dpkd", f"out={tmp_path / 'dpkd'}",
                                      f"student.path={tmp_path / 'student' / 'model'}",
                                      f"teacher.path={tmp_path / 'teacher' / 'model'}",
                                      f"data.prompts={files['train']}", f"data.corpus={files['corpus']}",
                                      "distill.lm_block_size=16", "sampling.max_new_tokens=6", *common])
            assert res.exit_code == 0, res.output
    finally:
        lib_logger.removeHandler(caplog.handler)
    deprecated = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
                  if issubclass(w.category, DEPRECATIONS)]
    assert not deprecated, "\n".join(deprecated)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("transformers") and
              "deprecat" in r.getMessage().lower()]
    assert not logged, "\n".join(logged)
