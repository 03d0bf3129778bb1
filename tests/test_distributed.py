"""aiaas_fast.fit under torchrun: 2 CPU processes (gloo) give the same model as one
process training on the same global batches."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch


SCRIPT = textwrap.dedent("""
    import sys, torch, aiaas_fast
    out, per_rank_batch = sys.argv[1], int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(250, 4, generator=g)           # 200 training rows: the last global batch is partial
    y = (x[:, :2] ** 2).sum(1, keepdim=True) + 0.1 * torch.randn(250, 1, generator=g)
    torch.manual_seed(0)
    model = aiaas_fast.nn.MLP(4, [16, 16], 1)
    history = aiaas_fast.fit(model, x, y, epochs=3, batch_size=per_rank_batch, lr=1e-2, seed=4, progress=False)
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
    else:
        rank = 0
    torch.save({"state": model.state_dict(), "loss": history["train_loss"], "val": history["val_rmse"]},
               f"{out}.rank{rank}")
""")


@pytest.mark.slow
def test_two_process_ddp_equals_single_process_on_the_same_global_batches(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = str(tmp_path / "result")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run([*torchrun, str(script), out + "-ddp", "16"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(script), out + "-single", "32"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    single = torch.load(out + "-single.rank0")
    for rank in (0, 1):
        ddp = torch.load(f"{out}-ddp.rank{rank}")
        for name, v in single["state"].items():
            torch.testing.assert_close(ddp["state"][name], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank} {name}: {m}")
        torch.testing.assert_close(torch.tensor(ddp["loss"]), torch.tensor(single["loss"]), rtol=1e-4, atol=1e-6)
