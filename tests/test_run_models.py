"""The run's models (pipeline.run.models): built once for every stage that calls them, released after their last
stage and before a stage that loads weights of its own; a round's default size comes from the model's capacity;
a Ray worker of a vLLM model reserves the engine's GPUs."""

from types import SimpleNamespace

import pytest

from pipeline.config import StageSpec, load_config
from pipeline.errors import UserError
from pipeline.run.models import RunModels

TABLE = {"generate": "pipeline.stages.generate", "template": "pipeline.stages.template",
         "judge": "pipeline.stages.judge", "sft": "pipeline.stages.generate"}  # sft: a stage calling no model here


class Counted:
    def __init__(self, name, log):
        self.name, self.log = name, log
        log.append(("build", name))

    def check(self):
        self.log.append(("check", self.name))

    def close(self):
        self.log.append(("close", self.name))

    def stats(self):
        return {"ray_actor_starts": 2, "ray_calls": 1, "ray_workers": 2}


def stage(name, kind, model=None):
    return StageSpec(name, kind, SimpleNamespace(model=model))


def test_a_model_lives_from_its_first_stage_to_its_last():
    log = []
    config = SimpleNamespace(stages=[stage("gen", "generate", "t"), stage("template", "template"),
                                     stage("judge", "judge", "t"), stage("score", "judge", "u")])
    models = RunModels(config, TABLE, lambda name: Counted(name, log))
    models.before_stage(0)
    assert models.get("t") is models.get("t")
    models.after_stage(0)
    models.before_stage(1)
    models.after_stage(1)
    models.before_stage(2)
    models.get("t")
    assert log == [("build", "t"), ("check", "t")]  # one build for both stages, and the stage between
    models.after_stage(2)
    assert log[-1] == ("close", "t") and "t" not in models.held
    models.get("u")
    models.close()
    assert log[-1] == ("close", "u") and not models.held
    assert models.stats["t"] == {"ray_actor_starts": 2, "ray_calls": 1, "ray_workers": 2}


def test_a_stage_loading_weights_finds_the_memory_free_and_a_later_call_rebuilds():
    log = []
    config = SimpleNamespace(stages=[stage("gen", "generate", "t"), stage("model", "sft"),
                                     stage("judge", "judge", "t")])
    models = RunModels(config, TABLE, lambda name: Counted(name, log))
    models.get("t")
    models.after_stage(0)
    assert "t" in models.held  # judge calls it later
    models.before_stage(1)
    assert log[-1] == ("close", "t") and "t" not in models.held
    models.get("t")
    models.close()
    assert log.count(("build", "t")) == 2
    assert models.stats["t"]["ray_actor_starts"] == 4 and models.stats["t"]["ray_workers"] == 2


def test_a_failed_check_closes_the_backend_and_keeps_nothing():
    log = []

    class Broken(Counted):
        def check(self):
            raise RuntimeError("down")

    models = RunModels(SimpleNamespace(stages=[stage("gen", "generate", "t")]), TABLE, lambda n: Broken(n, log))
    with pytest.raises(RuntimeError):
        models.get("t")
    assert log == [("build", "t"), ("close", "t")] and not models.held


def config_with(tmp_path, model: str, generate: str = ""):
    path = tmp_path / "c.yaml"
    path.write_text(f"name: c\nmodels:\n  m: {model}\nstages:\n  seeds: {{path: x.jsonl}}\n"
                    f"  generate: {{model: m{generate}}}\n")
    return load_config(path)


@pytest.mark.parametrize("model, size", [
    ("{backend: test}", 8),
    ("{backend: openai, model: x, max_concurrency: 24}", 24),
    ("{backend: openai, model: x, max_concurrency: 24, executor: ray, ray: {workers: 3}}", 72),
    ("{backend: transformers, model: x, batch_size: 5}", 5),
    ("{backend: vllm, model: x}", 256),
])
def test_a_round_holds_what_the_model_runs_at_once(tmp_path, model, size):
    stage = config_with(tmp_path, model).stages[1]
    assert stage.options.batch_size == size


def test_an_explicit_round_size_is_kept(tmp_path):
    assert config_with(tmp_path, "{backend: vllm, model: x}", ", batch_size: 3").stages[1].options.batch_size == 3


def test_a_ray_worker_of_vllm_reserves_the_engines_gpus(tmp_path):
    from pipeline.run.executors.ray import gpus_per_worker

    spec = config_with(tmp_path, "{backend: vllm, model: x, tensor_parallel_size: 2, executor: ray}").models["m"]
    assert gpus_per_worker(spec.backend, spec.options, spec.ray) == 2
    with pytest.raises(UserError, match="num_gpus_per_worker: 1 GPUs per worker.*needs 2"):
        config_with(tmp_path, "{backend: vllm, model: x, tensor_parallel_size: 2, executor: ray, "
                              "ray: {num_gpus_per_worker: 1}}")
