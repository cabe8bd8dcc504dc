"""`jaxinfer run --config experiments/moe.py --config.smoke=True`: dense and MoE trained, expert load logged per
step, the capacity sweep drops assignments only below dropless, all-to-all bytes read from the HLO."""

from jaxinfer.experiments.moe import SMOKE, all_to_all_bytes


def test_moe_smoke(run_experiment, tmp_path):
  ran = run_experiment("moe", f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.max_bytes=200000",
                       "--config.data.eval_fraction=0.1")
  finals = {r["variant"]: r for r in ran.rows("final")}
  assert set(finals) == {"dense", "moe"}
  assert finals["moe"]["active_params"] < finals["moe"]["total_params"]
  assert abs(finals["moe"]["active_params"] - finals["dense"]["active_params"]) <= 8 * 32  # router only
  loads = ran.rows("expert_load")
  assert [r["step"] for r in loads] == list(range(1, SMOKE["steps"] + 1))
  assert all(abs(sum(r["load"][0]) - 1) < 1e-4 and len(r["load"][0]) == SMOKE["num_experts"] for r in loads)
  sweep = {r["capacity_factor"]: r for r in ran.rows("capacity")}
  assert sweep[0.0]["dropped"] == 0 and sweep[1.0]["dropped"] >= 0
  a2a = {r["expert_axis"]: r for r in ran.rows("all_to_all")}
  assert a2a[1]["all_to_all_ops"] == 0 and a2a[2]["all_to_all_ops"] > 0 and a2a[2]["bytes_per_device"] > 0
  assert "Against the papers' claims" in ran.markdown
  for png in ("loss.png", "expert_load.png", "capacity_and_all_to_all.png"):
    assert (ran.dir / png).stat().st_size > 1000


def test_all_to_all_bytes_parses_hlo():
  hlo = ("%a = f32[2,8,16]{2,1,0} all-to-all(f32[2,8,16]{2,1,0} %x), dimensions={0}\n"
         "%b = (s32[4,3]{1,0}, bf16[4]{0}) all-to-all(s32[4,3]{1,0} %y, bf16[4]{0} %z)\n%c = f32[9] add(%p, %q)")
  assert all_to_all_bytes(hlo) == (2, 2 * 8 * 16 * 4 + 4 * 3 * 4 + 4 * 2)
