"""Helpers the commands share: the model/adapter flags."""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="adapter folder (PEFT layout); omit to use the model alone")
    p.add_argument("--model", help="base or merged model folder / hub id (default: the "
                                   "adapter's base model, else the embedded SmolLM2)")

