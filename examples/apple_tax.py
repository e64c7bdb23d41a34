"""The computational-graph example from "Deep Learning from Scratch", chapter 5.

Buy 2 apples at 100 and 3 oranges at 150, pay 10% tax: forward gives the
price, backward gives how much the price moves per unit change of each input.

    apple ──┐
            (×)── apple_price ──┐
    n_apple ┘                   (+)── all_price ──┐
    orange ─┐                   │                 (×)── price
            (×)── orange_price ─┘          tax ───┘
    n_orange┘

Run:  python examples/apple_tax.py
"""

from __future__ import annotations

from xpnet import Add, Mul


def apple_tax(apple=100, apple_num=2, orange=150, orange_num=3, tax=1.1):
    """Forward and backward through the graph; returns (price, gradients dict)."""
    mul_apple, mul_orange, add_fruit, mul_tax = Mul(), Mul(), Add(), Mul()

    apple_price = mul_apple.forward(apple, apple_num)
    orange_price = mul_orange.forward(orange, orange_num)
    all_price = add_fruit.forward(apple_price, orange_price)
    price = mul_tax.forward(all_price, tax)

    dprice = 1
    dall_price, dtax = mul_tax.backward(dprice)
    dapple_price, dorange_price = add_fruit.backward(dall_price)
    dorange, dorange_num = mul_orange.backward(dorange_price)
    dapple, dapple_num = mul_apple.backward(dapple_price)
    grads = {
        "apple": dapple,
        "apple_num": dapple_num,
        "orange": dorange,
        "orange_num": dorange_num,
        "tax": dtax,
    }
    return price, grads


def main() -> None:
    price, grads = apple_tax()
    print(f"price = {price:g}   (2 apples x 100 + 3 oranges x 150, plus 10% tax)")
    print("d price / d ...")
    for name, g in grads.items():
        # The inputs are exact decimals but 1.1 is not a binary float: print 12 significant digits.
        print(f"  {name:<10} = {g:.12g}")


if __name__ == "__main__":
    main()
