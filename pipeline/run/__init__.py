"""Running a pipeline: the runner, the request journal, the journaled model client, the manifest."""
