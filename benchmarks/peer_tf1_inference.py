"""Inference speed of the chapter's TensorFlow 1 peer, built with the peer's own layer functions.

../shared/peers/seed_tf1.py times training only; this script imports its `conv_layer` and `fc_layer`,
builds the same graph, and times prediction: batches of 1,000 (--batch-size) and single images. Run it with the
peer's Python (a virtual environment with tensorflow-cpu):

    /tmp/tf/bin/python benchmarks/peer_tf1_inference.py --peer ../shared/peers/seed_tf1.py

Prints one JSON object.
"""

import argparse
import importlib.util
import json
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", required=True, help="path of seed_tf1.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--single", type=int, default=300, help="single-image predictions to time")
    args = ap.parse_args()

    spec = importlib.util.spec_from_file_location("seed_tf1", args.peer)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    tf = peer.tf

    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(123)
        x = tf.placeholder(tf.float32, [None, 784])
        keep = tf.placeholder(tf.float32)
        image = tf.reshape(x, [-1, 28, 28, 1])
        h1 = tf.nn.max_pool(peer.conv_layer(image, "conv_1", (5, 5), 32), [1, 2, 2, 1], [1, 2, 2, 1], "SAME")
        h2 = tf.nn.max_pool(peer.conv_layer(h1, "conv_2", (5, 5), 64), [1, 2, 2, 1], [1, 2, 2, 1], "SAME")
        h3 = tf.nn.dropout(peer.fc_layer(h2, "fc_3", 1024, tf.nn.relu), keep_prob=keep)
        logits = peer.fc_layer(h3, "fc_4", 10)
        probabilities = tf.nn.softmax(logits)
        init = tf.global_variables_initializer()

    config = tf.ConfigProto(
        intra_op_parallelism_threads=args.threads, inter_op_parallelism_threads=args.threads
    )
    X = np.random.RandomState(0).randn(args.images, 784).astype(np.float32)
    with tf.Session(graph=graph, config=config) as sess:
        sess.run(init)
        bs = args.batch_size
        for start in range(0, 3000, bs):  # warm-up
            sess.run(probabilities, {x: X[start : start + bs], keep: 1.0})
        t0 = time.perf_counter()
        for start in range(0, args.images, bs):
            sess.run(probabilities, {x: X[start : start + bs], keep: 1.0})
        batch_s = time.perf_counter() - t0
        latencies = []
        for i in range(args.single):
            t0 = time.perf_counter()
            sess.run(probabilities, {x: X[i : i + 1], keep: 1.0})
            latencies.append(time.perf_counter() - t0)
    latencies = np.array(latencies[20:]) * 1e3
    print(
        json.dumps(
            {
                "peer": "seed-tf1",
                "images_per_s": args.images / batch_s,
                "batch_size": bs,
                "p50_ms": float(np.percentile(latencies, 50)),
                "p99_ms": float(np.percentile(latencies, 99)),
            }
        )
    )


if __name__ == "__main__":
    main()
