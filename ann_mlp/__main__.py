from ann_mlp.cli import main

main()
