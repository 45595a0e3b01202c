"""Prompt learning without training: templates, verbalizers, demonstrations, calibration, and
the `lmadapt prompt` runner (`lmadapt.prompting.runner.run_prompt`).

The package imports nothing: the classification tasks import templates and verbalizers from here
while the task registry is being built, and the runner (which loads models, tasks and reports)
must not come with them.
"""
