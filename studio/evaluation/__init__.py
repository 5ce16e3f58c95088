"""Checkpoint evaluation: a fixed prompt set per concept and without triggers, generated with fixed
seeds on every checkpoint of a run and on the base model, tagged with the WD tagger and scored for
fidelity, bleed and flexibility (prompts.py, scoring.py, run.py). Importing it does no work."""
