"""Keras -> verified ONNX bundle: conversion with tf2onnx, fused or split graphs, verification against Keras,
optional static INT8, the manifest.

May import: the core (`inference`: the bundle format, the engine and routing it verifies with), TensorFlow,
tf2onnx, onnx, `training.architecture` (the one definition of the models). Never the HTTP service.
"""
