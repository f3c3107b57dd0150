"""One failed job must not end a DDP multirun: a rank that crashes fails its own job, the jobs after
it still run, and the sweep reports the failure at the end (exit status 1), as without DDP.

Lightning's launcher watches the ranks it starts and SIGKILLs the launching process when one of
them fails; under Hydra's multirun that process is the whole sweep (exit 137, later jobs never
run, W&B left open). ``utils/ddp_jobs.LaunchedRanks`` watches them instead."""

from __future__ import annotations

import subprocess

import pytest

from diffusion_lab.utils.ddp_jobs import LaunchedRanks, RankFailed

from tests.multiproc import start_cli, tiny
from tests.wandb_offline import find_offline_runs

CRASH = ["+callbacks.crash._target_=tests.multiproc.CrashOnRank"]  # rank=-1: no crash


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_a_crashing_rank_fails_its_job_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    # job 0: rank 1 raises at its first step, rank 0 is left in the gradient all-reduce; job 1 is healthy
    args = ["-m", *tiny("trainer=ddp_cpu", "logger=wandb", "data.batch_size=16", "trainer.max_steps=1", "trainer.val_check_interval=1",
                        "trainer.limit_val_batches=1", "callbacks.sample_grid=null", "callbacks.noising_strip=null"),
            *CRASH, "+callbacks.crash.rank=1,-1", f"hydra.sweep.dir={sweep}"]
    log_file = tmp_path / "cli.log"  # not a pipe: a rank orphaned by a killed sweep would hold it open
    proc = start_cli(args, tmp_path, log_file)
    try:
        proc.wait(timeout=400)
    finally:
        proc.kill()
    out = log_file.read_text()
    assert proc.returncode == 1, (proc.returncode, out[-3000:])  # reported at the end; before: -9, SIGKILLed by Lightning
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    # the job after the failure trained and exported
    assert (sweep / "1" / "pipeline" / "model_index.json").is_file() and not (sweep / "0" / "pipeline").exists()
    # the failure names the rank, its exit code and its log, which holds the rank's own error
    log = sweep / "0" / "train_ddp_process_1.log"
    assert f"DDP rank 1 of this job exited with code 1 (its log: {log})" in out
    assert "simulated crash of rank 1 at step 0" in out
    runs = find_offline_runs(sweep)
    assert [r.name for r in runs] == ["#0 rank=1", "#1 rank=-1"]
    assert [r.exit_code for r in runs] == [1, 0]  # W&B finished for the failed job, marked failed


def _ranks(*commands: list[str], **kwargs) -> LaunchedRanks:
    ranks = LaunchedRanks("/runs/job", **{"poll_s": 0.05, **kwargs})
    ranks.watch([subprocess.Popen(c) for c in commands])
    return ranks


def test_a_failed_rank_stops_the_other_ranks_but_not_this_process():
    stuck = []
    ranks = _ranks(["sh", "-c", "exit 3"], ["sleep", "60"], stuck_after_s=30, on_stuck=lambda: stuck.append(True))
    ranks.procs[1].wait(timeout=10)  # killed by the watcher, not after 60 s
    assert ranks.failed == (1, 3) and ranks.procs[1].returncode < 0
    ranks.end_job(ok=False)  # this rank failed too (its collective lost the peer): nothing more to raise
    assert stuck == []


def test_this_process_is_killed_only_when_it_stays_stuck_after_a_rank_failed():
    stuck = []
    ranks = _ranks(["sh", "-c", "exit 3"], stuck_after_s=0.2, on_stuck=lambda: stuck.append(True))
    ranks.procs[0].wait(timeout=10)
    for _ in range(100):  # the job never ends here: what a collective that never returns looks like
        if stuck:
            break
        ranks._job_over.wait(0.05)
    assert stuck == [True]


def test_a_job_that_finished_here_but_failed_in_another_rank_is_a_failed_job():
    ranks = _ranks(["sh", "-c", "sleep 0.3; exit 2"], poll_s=60)
    with pytest.raises(RankFailed, match=r"DDP rank 1 of this job exited with code 2 \(its log: /runs/job/train_ddp_process_1.log\)"):
        ranks.end_job(ok=True)


def test_ranks_that_do_not_exit_after_the_job_are_killed():
    ranks = _ranks(["sleep", "60"])
    with pytest.raises(RankFailed, match="exited with code -9"):
        ranks.end_job(ok=True, timeout_s=0.2)


def test_lightnings_observer_is_replaced_for_the_job_only():
    from pytorch_lightning.strategies.launchers import subprocess_script

    original = subprocess_script._launch_process_observer
    ranks = LaunchedRanks()
    with ranks.replacing_lightning_observer():
        assert subprocess_script._launch_process_observer == ranks.watch
    assert subprocess_script._launch_process_observer is original
