"""The book's scripts run on xpnet by changing only their imports.

Each test is written the way "Deep Learning from Scratch" writes its scripts (chapters 5 and
7): its own TwoLayerNet and SimpleConvNet classes built from layers in an OrderedDict,
float64 weights from ``np.random.randn`` and float32 data from ``load_mnist(normalize=True,
one_hot_label=True)``, the plain SGD loop, and a Trainer and Adam of its own; only the
imports point at xpnet.  (Our code in the book's style, not the book's.)

The data is a small MNIST-format set made here, where each class is a bright bar at its own
place, so a few hundred steps learn it; ``load_mnist``'s default name finds it through
``XPNET_DATA``, as the book's ``load_mnist()`` finds its own files.
"""

from __future__ import annotations

import gzip
from collections import OrderedDict

import numpy as np
import pytest

from test_datasets import idx_bytes
from xpnet import Affine, Convolution, Pooling, Relu, SoftmaxWithLoss
from xpnet import SimpleConvNet as XpnetSimpleConvNet
from xpnet import TwoLayerNet as XpnetTwoLayerNet
from xpnet.datasets import load_mnist


def _bars(rng, n):
    """n 28x28 uint8 images: class k is a bright horizontal bar at rows 2k+4..2k+6, noise."""
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 4:2 * k + 7, 4:24] = 220
    return images, labels


@pytest.fixture
def book_data(tmp_path, monkeypatch):
    """The four MNIST files in $XPNET_DATA/mnist, nothing in the other places looked at."""
    rng = np.random.default_rng(0)
    directory = tmp_path / "data" / "mnist"
    directory.mkdir(parents=True)
    for prefix, n in (("train", 600), ("t10k", 200)):
        images, labels = _bars(rng, n)
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(images)))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(labels)))
    monkeypatch.setenv("XPNET_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr("xpnet.datasets.SYSTEM_DATA_DIR", tmp_path / "none")
    monkeypatch.chdir(tmp_path)


# -- chapter 5: the book's two-layer net, on xpnet's layers -----------------------------------


class TwoLayerNet:
    def __init__(self, input_size, hidden_size, output_size, weight_init_std=0.01):
        self.params = {}
        self.params['W1'] = weight_init_std * np.random.randn(input_size, hidden_size)
        self.params['b1'] = np.zeros(hidden_size)
        self.params['W2'] = weight_init_std * np.random.randn(hidden_size, output_size)
        self.params['b2'] = np.zeros(output_size)

        self.layers = OrderedDict()
        self.layers['Affine1'] = Affine(self.params['W1'], self.params['b1'])
        self.layers['Relu1'] = Relu()
        self.layers['Affine2'] = Affine(self.params['W2'], self.params['b2'])
        self.lastLayer = SoftmaxWithLoss()

    def predict(self, x):
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def loss(self, x, t):
        y = self.predict(x)
        return self.lastLayer.forward(y, t)

    def accuracy(self, x, t):
        y = np.argmax(self.predict(x), axis=1)
        if t.ndim != 1:
            t = np.argmax(t, axis=1)
        return np.sum(y == t) / float(x.shape[0])

    def numerical_gradient(self, x, t):
        loss_W = lambda W: self.loss(x, t)  # (the book's way)
        grads = {}
        for key in ('W1', 'b1', 'W2', 'b2'):
            grads[key] = _numerical_gradient(loss_W, self.params[key])
        return grads

    def gradient(self, x, t):
        self.loss(x, t)
        dout = 1
        dout = self.lastLayer.backward(dout)
        layers = list(self.layers.values())
        layers.reverse()
        for layer in layers:
            dout = layer.backward(dout)
        grads = {}
        grads['W1'], grads['b1'] = self.layers['Affine1'].dW, self.layers['Affine1'].db
        grads['W2'], grads['b2'] = self.layers['Affine2'].dW, self.layers['Affine2'].db
        return grads


def _numerical_gradient(f, x):
    """The book's central differences, element by element, in place."""
    h = 1e-4
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=['multi_index'], op_flags=['readwrite'])
    while not it.finished:
        idx = it.multi_index
        tmp_val = x[idx]
        x[idx] = float(tmp_val) + h
        fxh1 = f(x)
        x[idx] = tmp_val - h
        fxh2 = f(x)
        grad[idx] = (fxh1 - fxh2) / (2 * h)
        x[idx] = tmp_val
        it.iternext()
    return grad


def _train_like_chapter_5(network, x_train, t_train, iters_num=300, batch_size=100,
                          learning_rate=0.1):
    train_size = x_train.shape[0]
    train_loss_list = []
    for _ in range(iters_num):
        batch_mask = np.random.choice(train_size, batch_size)
        x_batch = x_train[batch_mask]
        t_batch = t_train[batch_mask]
        grad = network.gradient(x_batch, t_batch)
        for key in ('W1', 'b1', 'W2', 'b2'):
            network.params[key] -= learning_rate * grad[key]
        train_loss_list.append(float(network.loss(x_batch, t_batch)))
    return train_loss_list


def test_chapter_5_train_neuralnet_with_xpnets_two_layer_net(book_data):
    np.random.seed(0)
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize=True, one_hot_label=True)
    network = XpnetTwoLayerNet(input_size=784, hidden_size=50, output_size=10)
    losses = _train_like_chapter_5(network, x_train, t_train)
    assert losses[-1] < losses[0] / 4
    assert network.accuracy(x_test, t_test) > 0.9


def test_chapter_5_the_books_own_net_on_xpnets_layers(book_data):
    """float64 weights (np.random.randn) and float32 data (load_mnist): the layers compute in
    their weights' dtype, so this is NumPy's promotion, to the bit."""
    np.random.seed(0)
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize=True, one_hot_label=True)
    assert x_train.dtype == np.float32
    network = TwoLayerNet(input_size=784, hidden_size=50, output_size=10)
    x = x_train[:3]
    scores = network.predict(x)
    W1, b1, W2, b2 = (network.params[k] for k in ('W1', 'b1', 'W2', 'b2'))
    assert scores.dtype == np.float64
    np.testing.assert_array_equal(scores, np.maximum(x @ W1 + b1, 0) @ W2 + b2)
    # The book's gradient_check.py: backprop against numerical gradients.
    grad_numerical = network.numerical_gradient(x, t_train[:3])
    grad_backprop = network.gradient(x, t_train[:3])
    for key in grad_numerical:
        assert np.average(np.abs(grad_backprop[key] - grad_numerical[key])) < 1e-8, key
    losses = _train_like_chapter_5(network, x_train, t_train)
    assert losses[-1] < losses[0] / 4
    assert network.accuracy(x_test, t_test) > 0.9


# -- chapter 7: the book's SimpleConvNet on xpnet's layers, and its Trainer and Adam ----------


class SimpleConvNet:
    def __init__(self, input_dim=(1, 28, 28),
                 conv_param={'filter_num': 30, 'filter_size': 5, 'pad': 0, 'stride': 1},  # noqa: B006
                 hidden_size=100, output_size=10, weight_init_std=0.01):
        filter_num = conv_param['filter_num']
        filter_size = conv_param['filter_size']
        filter_pad = conv_param['pad']
        filter_stride = conv_param['stride']
        input_size = input_dim[1]
        conv_output_size = (input_size - filter_size + 2 * filter_pad) / filter_stride + 1
        pool_output_size = int(filter_num * (conv_output_size / 2) * (conv_output_size / 2))

        self.params = {}
        self.params['W1'] = weight_init_std * np.random.randn(
            filter_num, input_dim[0], filter_size, filter_size)
        self.params['b1'] = np.zeros(filter_num)
        self.params['W2'] = weight_init_std * np.random.randn(pool_output_size, hidden_size)
        self.params['b2'] = np.zeros(hidden_size)
        self.params['W3'] = weight_init_std * np.random.randn(hidden_size, output_size)
        self.params['b3'] = np.zeros(output_size)

        self.layers = OrderedDict()
        self.layers['Conv1'] = Convolution(self.params['W1'], self.params['b1'],
                                           conv_param['stride'], conv_param['pad'])
        self.layers['Relu1'] = Relu()
        self.layers['Pool1'] = Pooling(pool_h=2, pool_w=2, stride=2)
        self.layers['Affine1'] = Affine(self.params['W2'], self.params['b2'])
        self.layers['Relu2'] = Relu()
        self.layers['Affine2'] = Affine(self.params['W3'], self.params['b3'])
        self.last_layer = SoftmaxWithLoss()

    def predict(self, x):
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def loss(self, x, t):
        y = self.predict(x)
        return self.last_layer.forward(y, t)

    def accuracy(self, x, t, batch_size=100):
        if t.ndim != 1:
            t = np.argmax(t, axis=1)
        acc = 0.0
        for i in range(int(x.shape[0] / batch_size)):
            tx = x[i * batch_size:(i + 1) * batch_size]
            tt = t[i * batch_size:(i + 1) * batch_size]
            y = np.argmax(self.predict(tx), axis=1)
            acc += np.sum(y == tt)
        return acc / x.shape[0]

    def numerical_gradient(self, x, t):
        loss_w = lambda w: self.loss(x, t)
        grads = {}
        for idx in (1, 2, 3):
            grads['W' + str(idx)] = _numerical_gradient(loss_w, self.params['W' + str(idx)])
            grads['b' + str(idx)] = _numerical_gradient(loss_w, self.params['b' + str(idx)])
        return grads

    def gradient(self, x, t):
        self.loss(x, t)
        dout = 1
        dout = self.last_layer.backward(dout)
        layers = list(self.layers.values())
        layers.reverse()
        for layer in layers:
            dout = layer.backward(dout)
        grads = {}
        grads['W1'], grads['b1'] = self.layers['Conv1'].dW, self.layers['Conv1'].db
        grads['W2'], grads['b2'] = self.layers['Affine1'].dW, self.layers['Affine1'].db
        grads['W3'], grads['b3'] = self.layers['Affine2'].dW, self.layers['Affine2'].db
        return grads


class Adam:
    """The book's Adam (common/optimizer.py's update rule), in place on the params dict."""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999):
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.iter, self.m, self.v = 0, None, None

    def update(self, params, grads):
        if self.m is None:
            self.m, self.v = {}, {}
            for key, val in params.items():
                self.m[key] = np.zeros_like(val)
                self.v[key] = np.zeros_like(val)
        self.iter += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2 ** self.iter) / (1.0 - self.beta1 ** self.iter)
        for key in params.keys():  # noqa: SIM118 (as the book writes it)
            self.m[key] += (1 - self.beta1) * (grads[key] - self.m[key])
            self.v[key] += (1 - self.beta2) * (grads[key] ** 2 - self.v[key])
            params[key] -= lr_t * self.m[key] / (np.sqrt(self.v[key]) + 1e-7)


class Trainer:
    """The book's Trainer (common/trainer.py's loop): mini-batches, an optimizer's update,
    the accuracies after each epoch."""

    def __init__(self, network, x_train, t_train, x_test, t_test, epochs=20,
                 mini_batch_size=100, optimizer_param={'lr': 0.01}):  # noqa: B006
        self.network = network
        self.x_train, self.t_train, self.x_test, self.t_test = x_train, t_train, x_test, t_test
        self.epochs, self.batch_size = epochs, mini_batch_size
        self.optimizer = Adam(**optimizer_param)
        self.train_size = x_train.shape[0]
        self.iter_per_epoch = max(self.train_size / mini_batch_size, 1)
        self.max_iter = int(epochs * self.iter_per_epoch)
        self.test_acc_list = []

    def train_step(self):
        batch_mask = np.random.choice(self.train_size, self.batch_size)
        x_batch = self.x_train[batch_mask]
        t_batch = self.t_train[batch_mask]
        grads = self.network.gradient(x_batch, t_batch)
        self.optimizer.update(self.network.params, grads)

    def train(self):
        for i in range(self.max_iter):
            self.train_step()
            if (i + 1) % int(self.iter_per_epoch) == 0:
                self.test_acc_list.append(self.network.accuracy(self.x_test, self.t_test))
        return self.network.accuracy(self.x_test, self.t_test)


def test_chapter_7_the_books_own_simple_convnet_on_xpnets_layers(book_data):
    np.random.seed(0)
    (x_train, t_train), (x_test, t_test) = load_mnist(flatten=False)
    # The book's gradient check, on part of one image (its float64 weights give float64
    # gradients; no convolution output of this seed lies within h of ReLU's kink).
    small = SimpleConvNet(input_dim=(1, 10, 10),
                          conv_param={'filter_num': 2, 'filter_size': 3, 'pad': 1, 'stride': 1},
                          hidden_size=4, output_size=10, weight_init_std=0.1)
    x = x_train[:1, :, 9:19, 9:19]
    grad_numerical = small.numerical_gradient(x, t_train[:1])
    grad_backprop = small.gradient(x, t_train[:1])
    for key in grad_numerical:
        assert np.abs(grad_backprop[key] - grad_numerical[key]).max() < 1e-7, key
    network = SimpleConvNet(input_dim=(1, 28, 28),
                            conv_param={'filter_num': 4, 'filter_size': 5, 'pad': 0, 'stride': 1},
                            hidden_size=10, output_size=10, weight_init_std=0.01)
    trainer = Trainer(network, x_train, t_train, x_test, t_test, epochs=4,
                      mini_batch_size=50, optimizer_param={'lr': 0.01})
    assert trainer.train() > 0.9


def test_chapter_7_train_convnet_with_xpnets_simple_convnet_and_save_params(book_data):
    np.random.seed(0)
    (x_train, t_train), (x_test, t_test) = load_mnist(flatten=False)
    network = XpnetSimpleConvNet(input_dim=(1, 28, 28),
                                 conv_param={'filter_num': 4, 'filter_size': 5, 'pad': 0,
                                             'stride': 1},
                                 hidden_size=10, output_size=10, weight_init_std=0.01)
    trainer = Trainer(network, x_train, t_train, x_test, t_test, epochs=4,
                      mini_batch_size=50, optimizer_param={'lr': 0.01})
    assert trainer.train() > 0.9

    network.save_params("params.pkl")  # (xpnet's .npz under the book's name: no pickle)
    restored = XpnetSimpleConvNet(input_dim=(1, 28, 28),
                                  conv_param={'filter_num': 4, 'filter_size': 5, 'pad': 0,
                                              'stride': 1},
                                  hidden_size=10, output_size=10, weight_init_std=0.01, seed=1)
    restored.load_params("params.pkl")
    np.testing.assert_array_equal(restored.predict(x_test), network.predict(x_test))
    other = XpnetSimpleConvNet(input_dim=(1, 28, 28),
                               conv_param={'filter_num': 5, 'filter_size': 5, 'pad': 0,
                                           'stride': 1},
                               hidden_size=10, output_size=10)
    before = {k: np.array(v) for k, v in other.params.items()}
    with pytest.raises(ValueError, match="params.pkl: W1 has shape"):
        other.load_params("params.pkl")
    for k, v in before.items():  # refused before anything changed
        np.testing.assert_array_equal(other.params[k], v)
