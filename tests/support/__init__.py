"""Helpers of the tests (references written from the papers, stand-ins, model makers, scripts):
imported as ``from support import hf_models``; nothing here is collected as a test."""
