"""The Gradio UI: one module per tab, plus shared formatters. No torch or diffusers here: callbacks
validate the form into a config, call one domain function, and format the result."""
