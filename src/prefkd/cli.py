"""Command line: `prefkd <verb> --config FILE key.sub=value ...`. The CLI only parses and calls."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from prefkd import config
from prefkd.console import console
from prefkd.errors import ConfigError, PrefkdError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Preference-based knowledge distillation of causal language models.")

Overrides = Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides", show_default=False)]
ConfigFile = Annotated[str | None, typer.Option("--config", help="YAML config file")]
Debug = Annotated[bool, typer.Option("--debug", help="show Python tracebacks")]
Resume = Annotated[bool, typer.Option("--resume", help="continue the run of the same settings already in the output")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="discard what a previous run left in the output")]


def _existing(resume: bool, overwrite: bool) -> str:
    """What a verb does with an output that already holds a run (prefkd.rundir): refuse unless told."""
    if resume and overwrite:
        raise ConfigError("pass --resume or --overwrite, not both")
    return "resume" if resume else "overwrite" if overwrite else "refuse"


def _keys_help(cls: type) -> str:
    # "\b" keeps click from rewrapping the listing.
    return "Config keys (key = default  help):\n\n\b\n" + "\n".join(config.describe(cls))


def _run(fn, debug: bool):
    from prefkd import rundir

    try:
        return fn()
    except PrefkdError as e:
        if debug:
            raise
        console.print(f"[red]error:[/] {e}", soft_wrap=True)  # one line, whatever the terminal's width
        sys.exit(2)
    finally:
        rundir.release_all()  # the verb's run directories are free again (in-process callers run several verbs)


from prefkd.recipes.compare import ExperimentConfig  # noqa: E402  (after the helpers: help text is built at import)


def _compare(config_file: str | None, overrides: list[str], base: dict) -> None:
    from prefkd.recipes.compare import run_compare

    run_compare(config.load(ExperimentConfig, config_file, overrides, base=base))


@app.command(epilog=_keys_help(ExperimentConfig))
def demo(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False,
         out: Annotated[str | None, typer.Option("--out", help="output directory (same as out=...)")] = None,
         methods: Annotated[str | None, typer.Option("--methods", help="comma-separated, e.g. kd,seqkd,dpkd,plad "
                                                                     "(same as methods=...)")] = None) -> None:
    """Build the embedded suite, SFT a teacher and a student, distil the student, evaluate, report (runs/demo)."""
    extra = ([f"out={out}"] if out else []) + ([f"methods={methods}"] if methods else [])
    _run(lambda: _compare(config_file, (overrides or []) + extra, {"out": "runs/demo"}), debug)


@app.command(epilog=_keys_help(ExperimentConfig))
def compare(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False) -> None:
    """A methods x seeds matrix from one config: train, evaluate, and a table with 95% intervals (resumable)."""
    _run(lambda: _compare(config_file, overrides or [], {}), debug)


@app.command()
def report(run_dir: Annotated[str, typer.Argument(help="an experiment's output directory (holds results.json)")],
           tag: Annotated[str, typer.Option("--tag", help="the comparison's tag (results-TAG.json)")] = "",
           debug: Debug = False) -> None:
    """Rebuild report.md and report.html (plots embedded) of a finished experiment."""
    from prefkd.recipes.compare import rebuild_report

    def go():
        md = rebuild_report(run_dir, tag)
        console.print(f"wrote {md} and {md.with_suffix('.html')}")

    _run(go, debug)


from prefkd.evaluate import scores_text  # noqa: E402
from prefkd.recipes.distill import DistillRun  # noqa: E402
from prefkd.recipes.evaluate import EvaluateRun  # noqa: E402
from prefkd.recipes.generate import GenerateRun  # noqa: E402
from prefkd.recipes.render import RenderRun  # noqa: E402
from prefkd.recipes.sft import SFTRun  # noqa: E402
from prefkd.recipes.winrate import WinRateRun  # noqa: E402


@app.command(epilog=_keys_help(SFTRun))
def sft(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False, resume: Resume = False,
        overwrite: Overwrite = False) -> None:
    """Supervised fine-tuning on records with references (teacher, or the student's initialisation)."""
    from prefkd.recipes.sft import run_sft

    def go():
        cfg = config.load(SFTRun, config_file, overrides or [])
        run_sft(cfg, existing=_existing(resume, overwrite))
        console.print(f"wrote {cfg.out}/model")

    _run(go, debug)


@app.command(epilog=_keys_help(DistillRun))
def distill(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False,
            method: Annotated[str | None, typer.Option("--method", help="same as method=...")] = None,
            resume: Resume = False, overwrite: Overwrite = False,
            samples_only: Annotated[bool, typer.Option("--samples-only", help="build the sample caches and stop "
                                                                          "(e.g. with vLLM, before a multi-GPU "
                                                                          "launch)")] = False) -> None:
    """Distil a teacher into a student with one method (see `prefkd methods`)."""
    from prefkd.recipes.distill import run_distill

    def go():
        cfg = config.load(DistillRun, config_file, (overrides or []) + ([f"method={method}"] if method else []))
        run_distill(cfg, existing=_existing(resume, overwrite), samples_only=samples_only)
        if not samples_only:
            console.print(f"wrote {cfg.out}/model")

    _run(go, debug)


@app.command()
def card(run_dir: Annotated[str, typer.Argument(help="the output directory of `prefkd sft` or `prefkd distill`")],
         eval_dir: Annotated[str | None, typer.Option("--eval", help="an evaluation directory (scores.json) whose "
                                                                     "results the card shows; default RUN_DIR/model/"
                                                                     "eval if it has one")] = None,
         push: Annotated[str, typer.Option("--push", help="also upload RUN_DIR/model to this Hub repo (user/name); "
                                                          "token from $HF_TOKEN or the run's hub.token")] = "",
         private: Annotated[bool | None, typer.Option("--private/--public", help="visibility of a repo --push "
                                                                                 "creates; default the run's "
                                                                                 "hub.private")] = None,
         debug: Debug = False) -> None:
    """Rebuild the Hugging Face model card (RUN_DIR/model/README.md) of a saved student; --push uploads it."""
    from prefkd.recipes.card import run_card

    def go():
        path = run_card(run_dir, eval_dir, push, private)
        console.print(f"wrote {path}" + (f" and pushed {path.parent} to {push}" if push else ""))

    _run(go, debug)


from prefkd.recipes.prepare import PrepareRun  # noqa: E402


@app.command(epilog=_keys_help(PrepareRun))
def prepare(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False) -> None:
    """Dolly splits as MiniLLM/DPKD use them (test 500, validation 1000, train = the rest), optional PLaD shards."""
    from prefkd.recipes.prepare import run_prepare

    _run(lambda: run_prepare(config.load(PrepareRun, config_file, overrides or [])), debug)


@app.command(epilog=_keys_help(GenerateRun))
def generate(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False,
             resume: Resume = False, overwrite: Overwrite = False) -> None:
    """Sample one response per prompt into a keyed, resumable jsonl cache (SeqKD and PLaD consume these)."""
    from prefkd.recipes.generate import run_generate

    def go():
        cfg = config.load(GenerateRun, config_file, overrides or [])
        rows = run_generate(cfg, existing=_existing(resume, overwrite))
        console.print(f"{cfg.out}: {len(rows)} responses, {sum(r['finished'] for r in rows)} ended with EOS")

    _run(go, debug)


from prefkd.recipes.teacher_logits import TeacherLogitsRun  # noqa: E402


@app.command("teacher-logits", epilog=_keys_help(TeacherLogitsRun))
def teacher_logits(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False,
                   model: Annotated[str | None, typer.Option("--model", help="the teacher (model=...)")] = None,
                   data: Annotated[str | None, typer.Option("--data", help="records (data=...)")] = None,
                   samples: Annotated[str | None, typer.Option("--samples", help="a `prefkd generate` cache of "
                                                                                 "these records: score its "
                                                                                 "responses (samples=...)")] = None,
                   top_k: Annotated[int | None, typer.Option("--top-k", help="log-probs kept per position "
                                                                             "(top_k=...)")] = None,
                   out: Annotated[str | None, typer.Option("--out", help="output directory (out=...)")] = None,
                   overwrite: Overwrite = False) -> None:
    """The teacher's top-k next-token log-probs on every response token of the data's sequences, in shards with a
    manifest (resumable): token-level methods then train from them with no teacher loaded (teacher.logits=DIR)."""
    from prefkd.recipes.teacher_logits import run_teacher_logits

    def go():
        flags = _flags(model=model, data=data, samples=samples, out=out,
                       top_k=None if top_k is None else str(top_k))
        run_teacher_logits(config.load(TeacherLogitsRun, config_file, [*(overrides or []), *flags]), overwrite)

    _run(go, debug)


@app.command(epilog=_keys_help(RenderRun))
def render(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False,
           model: Annotated[str | None, typer.Option("--model", help="model or tokenizer path (model=...)")] = None,
           data: Annotated[str | None, typer.Option("--data", help="records or conversations (data=...)")] = None,
           limit: Annotated[int | None, typer.Option("--limit", help="records shown, 0 = all (limit=...)")] = None,
           as_json: Annotated[bool, typer.Option("--json", help="one JSON object per record on stdout")] = False,
           ) -> None:
    """Print exactly the text a model sees for each record: the prompt and the response as rendered (chat template
    or Alpaca), their token counts, and which tokens are trained on."""
    from prefkd.recipes.render import as_json_lines, render_records, rendered_text

    def go():
        flags = _flags(model=model, data=data, limit=None if limit is None else str(limit))
        cfg = config.load(RenderRun, config_file, [*(overrides or []), *flags])
        about, rows = render_records(cfg)
        if as_json:
            sys.stdout.write(as_json_lines(rows))
            return
        sys.stdout.write(rendered_text(about, rows))

    _run(go, debug)


def _flags(**flags: str | None) -> list[str]:
    """Command-line flags as the key=value overrides they stand for (flags are aliases of config keys)."""
    return [f"{key}={value}" for key, value in flags.items() if value is not None]


@app.command(epilog=_keys_help(EvaluateRun))
def evaluate(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False,
             model: Annotated[str | None, typer.Option("--model", help="model path or hub id (model=...)")] = None,
             data: Annotated[str | None, typer.Option("--data", help="records: prefkd jsonl, Dolly, MiniLLM, csv, "
                                                                      "parquet, hub id (data=...)")] = None,
             seeds: Annotated[str | None, typer.Option("--seeds", help="e.g. 10,20,30,40,50 (eval.seeds=...)")] = None,
             out: Annotated[str | None, typer.Option("--out", help="output directory (out=...)")] = None,
             rescore: Annotated[str | None, typer.Option("--rescore", help="re-score an evaluation directory "
                                                                           "without generating (rescore=...)")] = None,
             judge: Annotated[str | None, typer.Option("--judge", help="reward model / causal LM path or 'rouge': "
                                                                       "adds win rates (judge.path=...)")] = None,
             ) -> None:
    """Sampled generation on a test set over several seeds: Rouge-L, exact match and optional judge win rates,
    overall, by kind, category and length bucket; predictions saved for re-scoring."""
    from prefkd.recipes.evaluate import output_dir, run_evaluate

    def go():
        extra = _flags(model=model, data=data, out=out, rescore=rescore, **{"eval.seeds": seeds,
                                                                            "judge.path": judge})
        cfg = config.load(EvaluateRun, config_file, (overrides or []) + extra)
        print(scores_text(run_evaluate(cfg)))
        console.print(f"wrote {output_dir(cfg)}: scores.json, prompt_scores.json, predictions.json, records.jsonl, "
                      "settings.json")

    _run(go, debug)


@app.command(epilog=_keys_help(WinRateRun))
def winrate(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False,
            a: Annotated[str | None, typer.Option("--a", help="responses A: model, evaluation dir, predictions.json "
                                                            "or sample cache (a=...)")] = None,
            b: Annotated[str | None, typer.Option("--b", help="responses B, same forms (b=...)")] = None,
            data: Annotated[str | None, typer.Option("--data", help="the prompts (data=...)")] = None,
            judge: Annotated[str | None, typer.Option("--judge", help="reward model / causal LM path or 'rouge' "
                                                                      "(judge.path=...)")] = None,
            out: Annotated[str | None, typer.Option("--out", help="json file for the result (out=...)")] = None,
            ) -> None:
    """Win rate of A's responses over B's under a judge, e.g. teacher vs student on the distillation set (T-S WR)."""
    from prefkd.recipes.winrate import run_winrate, summary_line

    def go():
        cfg = config.load(WinRateRun, config_file,
                          (overrides or []) + _flags(a=a, b=b, data=data, out=out, **{"judge.path": judge}))
        console.print(summary_line(run_winrate(cfg)))

    _run(go, debug)


from prefkd.serve import ServeRun  # noqa: E402


@app.command(epilog=_keys_help(ServeRun))
def serve(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False,
          model: Annotated[str | None, typer.Option("--model", help="model path or hub id (model=...)")] = None,
          port: Annotated[int | None, typer.Option("--port", help="port, default 8000 (port=...)")] = None,
          host: Annotated[str | None, typer.Option("--host", help="interface, default 127.0.0.1 (host=...)")] = None,
          ) -> None:
    """Serve a model as a teacher behind the OpenAI completions API (vLLM's subset: sampling and scoring by token
    ids), for `teacher.url=http://HOST:PORT/v1`."""
    from prefkd.serve import run_serve

    def go():
        flags = _flags(model=model, port=None if port is None else str(port), host=host)
        run_serve(config.load(ServeRun, config_file, [*(overrides or []), *flags]))

    _run(go, debug)


analyze_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Analyses of trained models.")
app.add_typer(analyze_app, name="analyze")

from prefkd.recipes.analyze import NoiseRun  # noqa: E402


@analyze_app.command(epilog=_keys_help(NoiseRun))
def noise(overrides: Overrides = None, config_file: ConfigFile = None, debug: Debug = False,
          model: Annotated[str | None, typer.Option("--model", help="model to perturb (model=...)")] = None,
          teacher: Annotated[str | None, typer.Option("--teacher", help="teacher (teacher=...)")] = None,
          data: Annotated[str | None, typer.Option("--data", help="records with references (data=...)")] = None,
          scales: Annotated[str | None, typer.Option("--scales", help="e.g. 0,0.01,0.05 (noise.scales=...)")] = None,
          out: Annotated[str | None, typer.Option("--out", help="output directory (out=...)")] = None) -> None:
    """DPKD Fig. 2: Gaussian weight noise at several scales; rKL, implicit reward and Rouge-L per perturbed model."""
    from prefkd.recipes.analyze import run_noise

    def go():
        extra = _flags(model=model, teacher=teacher, data=data, out=out, **{"noise.scales": scales})
        run_noise(config.load(NoiseRun, config_file, (overrides or []) + extra))

    _run(go, debug)


@app.command("methods")
def list_methods() -> None:
    """List the distillation methods with one-line descriptions."""
    from prefkd.methods import describe

    print("\n".join(describe()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
