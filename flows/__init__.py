"""Thin Prefect flows over :mod:`medtl.stages`. medtl itself never imports prefect."""
