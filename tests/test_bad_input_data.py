"""Bad input, round two: the data rows (issue 24). Files as they come back from a re-save or a
spreadsheet, a folder where a file belongs, a hub that cannot be reached. Each stops with one
line naming the fix, or warns in one line (naming the lines it skipped) and gives a correct
result. The catalogue's helpers (``Env``, ``LEAN``, ``no_weights``, ``lean_run``) are those of
test_bad_input.py."""

import re

import datasets
import numpy as np
import pytest
from conftest import SHARED
from test_bad_input import (  # noqa: F401
    LEAN,
    SST2_DEV,
    Env,
    no_weights,
    stops_with_one_line,
    warnings_of,
)
from test_run import cli, run

from experiments.data import TaskSpec, load_examples
from experiments.errors import RunError
from experiments.hub import OFFLINE_VARS


def split_rows(lines: list[str]) -> str:
    """An SST-2 file re-saved by a tool that took the stray carriage return before each tab
    (SST-2's older copies) for a line break: every row becomes ``sentence`` and ``\\tlabel``."""
    return "\n".join([lines[0], *(line.replace("\t", "\r\n\t") for line in lines[1:] if line)])


def with_bad_rows(lines: list[str], split_at: int, empty_at: int) -> str:
    """The file with one row split in two and one row's sentence emptied (1-based row
    numbers of ``lines``, the header being row 1)."""
    out = list(lines)
    out[empty_at - 1] = "\t" + out[empty_at - 1].split("\t")[1]
    out[split_at - 1] = out[split_at - 1].replace("\t", "\n\t")
    return "\n".join(out)


MRPC_DEV = (SHARED / "glue" / "MRPC" / "dev.tsv").read_bytes()
BOM = b"\xef\xbb\xbf"

# id, overrides (beyond the 2-label checkpoint and LEAN), the one line (a regex). All stop before
# any weights are loaded.
EARLY = [
    ("tsv-rows-split-by-a-resave",
     lambda e: [e.data(train=split_rows(SST2_DEV))],  # 872 rows, each now 2 lines
     r"train.tsv: 1744 of 1744 rows are malformed \(not 2 tab-separated fields or an empty "
     r"'sentence' at lines 2, 3, 4, 5, 6, \.\.\.\); the file looks re-saved with its rows split "
     r"across lines .*; use the task's official file"),
    ("tsv-mostly-empty-texts",
     lambda e: [e.data(train="\n".join([SST2_DEV[0], *("\t" + line.split("\t")[1]
                                                       for line in SST2_DEV[1:40]),
                                        *SST2_DEV[40:60]]))],
     r"train.tsv: 39 of 59 rows are malformed .* at lines 2, 3, 4, 5, 6, \.\.\.\); the file "
     r"looks re-saved"),
    ("tsv-quoted-header", lambda e: [e.data(train='"sentence"\t"label"\nfine film\t1\n')],
     r"train.tsv lacks column\(s\) \['sentence', 'label'\] needed by task sst2 \(has .*\) "
     r"\(column 'sentence' is written '\"sentence\"' \(quotes or case\); column 'label' is "
     r"written '\"label\"' \(quotes or case\)\); use the official GLUE file"),
    ("tsv-utf16", lambda e: [e.data(train="\n".join(SST2_DEV[:5]).encode("utf-16"))],
     r"train.tsv is UTF-16 text \(it starts with a UTF-16 byte-order mark\); re-save the file "
     r"as UTF-8"),
    ("sample-file-is-a-directory",
     lambda e: ["prune.importance=fisher_unlabeled", f"prune.sample_file={e.tmp}"],
     r"sample file .* is a directory; pass a text file with one example per line "
     r"\(prune.sample_file=/path/to/samples.txt\)"),
    ("sample-file-empty-text",
     lambda e: ["task=stsb", e.model("reg1"), "prune.importance=fisher_unlabeled",
                e.sample_file("A man is playing the cello.\t\n")],
     r"samples.txt, line 1: task stsb needs 2 texts separated by a tab per line, found an "
     r"empty text"),
    ("task-file-is-a-directory", lambda e: [f"task.local_dir={e.tmp / 'dirs'}"],
     r"dirs/train.tsv is a directory; task sst2 needs the GLUE file train.tsv there "
     r"\(task.local_dir= names the folder holding it\)"),
]


@pytest.mark.usefixtures("no_weights")  # imported from test_bad_input
@pytest.mark.parametrize("case,make,message", EARLY, ids=[c[0] for c in EARLY])
def test_bad_data_stops_before_weights_load(tiny_checkpoints, tmp_path, case, make, message):
    env = Env(tiny_checkpoints, tmp_path)
    (tmp_path / "dirs" / "train.tsv").mkdir(parents=True)
    stops_with_one_line(env, [env.model(), *LEAN, *make(env)], message)


def test_split_file_stops_the_cli_with_one_line(tmp_path):
    """The re-saved file through the real CLI: exit code 2, one line, no traceback."""
    env = Env({}, tmp_path)
    res, _ = cli(env.data(train=split_rows(SST2_DEV)), f"hydra.run.dir={tmp_path}/run")
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in out, out
    (line,) = out.strip().splitlines()
    assert "1744 of 1744 rows are malformed" in line and "looks re-saved" in line


def test_a_few_malformed_rows_warn_once_per_read_with_their_lines(tiny_checkpoints, tmp_path,
                                                                  caplog):
    """One row split in two and one empty sentence: skipped, their line numbers named in one
    line; the other rows are read as they are and the run finishes."""
    env = Env(tiny_checkpoints, tmp_path)
    record = run([env.model(), env.data(train=with_bad_rows(SST2_DEV, 5, 9)),
                  f"paths.cache_dir={tmp_path}/cache", *LEAN], env.out)
    assert record["complete"] is True
    lines = [w for w in warnings_of(caplog) if "malformed" in w]
    assert lines and all(w == lines[0] for w in lines)
    assert "\n" not in lines[0]
    assert re.search(r"train.tsv: skipped 3 malformed row\(s\) \(not 2 tab-separated fields, or "
                     r"an empty text\) at lines 5, 6, 10$", lines[0]), lines[0]
    spec = TaskSpec(name="sst2", kind="classification", num_labels=2, metric="accuracy",
                    text_columns=("sentence",), label_column="label",
                    local_dir=str(tmp_path / "data"))
    train, dev = load_examples(spec, "train"), load_examples(spec, "eval")
    assert len(train.texts) == len(dev.texts) - 2 == 870
    keep = [i for i in range(872) if i not in (3, 7)]  # rows 5 and 9 of the file
    assert train.texts == [dev.texts[i] for i in keep]
    assert np.array_equal(train.labels, dev.labels[keep])


@pytest.mark.parametrize("marks", [1, 2], ids=["bom", "double-bom"])
def test_byte_order_mark_in_the_header_is_read(tiny_checkpoints, tmp_path, caplog, marks):
    """GLUE's own MRPC files start with a UTF-8 byte-order mark; a re-save may add a second."""
    env = Env(tiny_checkpoints, tmp_path)
    data = env.data("MRPC", train=BOM * (marks - 1) + MRPC_DEV)
    record = run([env.model(), "task=mrpc", data, f"paths.cache_dir={tmp_path}/cache", *LEAN],
                 env.out)
    assert record["complete"] is True and "f1" in record["pruned"]
    assert not [w for w in warnings_of(caplog) if ".tsv" in w]


HUB_DOWN = ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")


@pytest.fixture
def hub_down(monkeypatch):
    """Hub allowed (no offline variable) but unreachable: ``load_dataset`` raises what
    ``datasets`` raises after its retries (about 30 s) when there is no network."""
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append(args)
        raise HUB_DOWN

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("task,ckpt,extra", [("sst2", "cls2", []),
                                             ("squad", "qa", ["task.max_seq_length=64"])])
def test_unreachable_hub_without_local_data_is_one_line(tiny_checkpoints, tmp_path, hub_down,
                                                        task, ckpt, extra):
    env = Env(tiny_checkpoints, tmp_path)
    with pytest.raises(RunError) as err:
        run([f"task={task}", env.model(ckpt), f"task.local_dir={tmp_path}/none", *extra, *LEAN],
            env.out)
    text = str(err.value)
    assert hub_down and "\n" not in text
    assert re.search(r"cannot reach the Hugging Face hub for .*:train \(ConnectionError: "
                     r"Couldn't reach 'nyu-mll/glue'.*\); put the task's files at .*/none/"
                     r"\{.*\} \(paths.data_dir= or task.local_dir=\), or, if the dataset is in "
                     r"the Hugging Face cache already, set HF_HUB_OFFLINE=1 "
                     r"HF_DATASETS_OFFLINE=1", text), text
    assert not (env.out / "results.json").exists()


@pytest.mark.parametrize("error", ["requests", "httpx", "timeout"])
def test_every_client_connection_error_is_caught(monkeypatch, tmp_path, error):
    import httpx
    import requests

    raised = {"requests": requests.exceptions.ConnectionError("Max retries exceeded"),
              "httpx": httpx.ConnectError("[Errno -2] Name or service not known"),
              "timeout": requests.exceptions.ReadTimeout("read timed out")}[error]
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)

    def load_dataset(*args, **kwargs):
        raise raised

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = TaskSpec(name="sst2", kind="classification", num_labels=2, metric="accuracy",
                    text_columns=("sentence",), label_column="label",
                    local_dir=str(tmp_path), hub_path="nyu-mll/glue", hub_name="sst2")
    with pytest.raises(RunError, match=r"cannot reach the Hugging Face hub for nyu-mll/glue/"
                                       r"sst2:validation \(" + type(raised).__name__):
        load_examples(spec, "eval")


def test_unknown_hub_dataset_names_the_setting(monkeypatch, tmp_path):
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)

    def load_dataset(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'nyu-mll/glu' doesn't exist")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = TaskSpec(name="sst2", kind="classification", num_labels=2, metric="accuracy",
                    text_columns=("sentence",), label_column="label", local_dir=str(tmp_path),
                    hub_path="nyu-mll/glu", hub_name="sst2")
    with pytest.raises(RunError, match=r"the hub has no dataset nyu-mll/glu/sst2:train .*; fix "
                                       r"task.hub_path / task.hub_name, or put the task's files"):
        load_examples(spec, "train")
