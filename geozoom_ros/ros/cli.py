"""ROS subcommands of `geozoom`: ``replay`` (a stand-in for ``ros2 bag play``).

Registration is cheap: rclpy and rosbags are imported inside the command function.
"""

from geozoom_ros.ros.replay import DEFAULT_DEPTH, QOS_CHOICES


def register(sub):
    """Add ``geozoom replay`` to the subcommand parsers ``sub``."""
    p = sub.add_parser(
        'replay', help='publish a rosbag2 live over ROS 2 with its original timing',
        description='Publish the messages of a rosbag2 (MCAP or sqlite3) over rclpy with their '
                    'recorded timing, like `ros2 bag play`. Ctrl-C (SIGINT) or SIGTERM stops '
                    'it cleanly.')
    p.add_argument('bag', metavar='BAG', help='rosbag2 folder (holding metadata.yaml)')
    p.add_argument('--rate', type=float, default=1.0,
                   help='playback speed factor (2 = twice as fast; default 1)')
    p.add_argument('--topics', nargs='+', metavar='T', default=None,
                   help='play only these topics (default: all topics of the bag)')
    p.add_argument('--loop', action='store_true', help='start again at the end until stopped')
    p.add_argument('--start-offset', type=float, default=0.0, metavar='S',
                   help='skip the first S seconds of the bag (default 0)')
    p.add_argument('--qos', choices=QOS_CHOICES, default='reliable',
                   help='publisher QoS: reliable, keep last --depth (default; large images '
                        'between processes need it) or sensor (best effort)')
    p.add_argument('--depth', type=int, default=DEFAULT_DEPTH,
                   help=f'queue depth of the reliable QoS (default {DEFAULT_DEPTH})')
    p.add_argument('--clock', action='store_true',
                   help='also publish the bag time on /clock (for use_sim_time nodes)')
    p.add_argument('--wait-for-subscribers', type=float, default=0.0, metavar='S',
                   help='before playing, wait up to S seconds for a subscriber on every '
                        'topic (default 0: start at once)')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    p.set_defaults(func=_replay)


def _replay(args):
    import signal
    import threading

    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions

    from geozoom_ros.ros.replay import BagPlayer, BagSource

    # Validate the bag before touching the middleware: bad input fails fast with one line.
    bag = BagSource(args.bag, args.topics)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    context = Context()
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    player = None
    try:
        node = rclpy.create_node('geozoom_replay', context=context)
        player = BagPlayer(node, bag, rate=args.rate, topics=args.topics, loop=args.loop,
                           start_offset_s=args.start_offset, qos=args.qos, depth=args.depth,
                           clock=args.clock, progress=not args.quiet)
        topics = ', '.join(f'{t} ({bag.counts[t]})' for t in player.publishers)
        print(f'geozoom replay: {bag.path} at rate {args.rate:g}: {topics}', flush=True)
        if args.wait_for_subscribers > 0:
            if not player.wait_for_subscribers(args.wait_for_subscribers, stop):
                print('geozoom replay: not every topic has a subscriber yet; playing anyway',
                      flush=True)
        stats = player.play(stop)
        if not stats.stopped and args.qos == 'reliable':
            player.flush(5.0)
        how = 'stopped' if stats.stopped else 'done'
        print(f'geozoom replay: {how}: {stats.messages} messages on {len(stats.per_topic)} '
              f'topics in {stats.wall_s:.2f} s ({stats.loops} complete passes, '
              f'max lateness {stats.max_lateness_s * 1e3:.1f} ms)', flush=True)
        return 0
    finally:
        if player is not None:
            player.close()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown(context=context)
        for s, h in previous.items():
            signal.signal(s, h)
